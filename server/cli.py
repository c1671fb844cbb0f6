"""The `reft-serve` command: run the server, train or import interventions locally, generate once, or manage
tenants and API keys (`admin`).

A user's mistake (a missing file, a bad JSONL line, an unknown tenant, a bad flag value) ends with one line on
stderr saying what to fix and exit code 1 (2 for usage errors, as argparse does), never a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from server.engine.launch import launch, spec_for
from server.logging_setup import LOG_FORMATS, LOG_LEVELS, configure_logging
from server.settings import TRAINING_EXAMPLES_CEILING, Settings, default_data_dir

DATA_DIR_ENV = "REFT_SERVE_DATA_DIR"


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless it has none, or its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or \
            action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _setting(name: str, text: str) -> str:
    """Help for a serve flag whose default is the Settings field's (the flag itself defaults to None: not given)."""
    default = Settings.model_fields[name].default
    return f"{text} (default: {default})" if default is not None else text

if TYPE_CHECKING:
    from adapters_store.backend import StoreBackend


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        help="default: auto, bfloat16 on GPU and float32 on CPU")
    parser.add_argument("--model-cache-dir", type=Path, help="where converted GGUF models are cached")


def _serve(args: argparse.Namespace) -> int:
    flags = dict(
        model=args.model, model_id=args.model_id, device=args.device, dtype=args.dtype, host=args.host,
        port=args.port, data_dir=args.data_dir, model_cache_dir=args.model_cache_dir,
        max_running=args.max_running, resident_interventions=args.resident_interventions,
        training_share=args.training_share, auth=args.auth, admin_key=_admin_key(args),
        request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout, store=args.store,
        limits_store=args.limits_store, otlp_endpoint=args.otlp_endpoint,
    )
    given = {name: value for name, value in flags.items() if value is not None}  # flags left out: settings default
    settings = Settings(**(setting_overrides(args.set, os.environ) | given))
    if args.ray:
        return _serve_on_ray(args, settings)
    if settings.model is not None and not Path(settings.model).expanduser().exists():
        raise UserError(f"--model {settings.model}: no such file or directory (give a local HF model directory or "
                        ".gguf file)")
    # The engine process starts first, so that it imports torch and loads the model while this process imports the
    # app (nothing above imports torch; see server.engine.launch).
    launched = launch(spec_for(settings)) if settings.engine_process else None
    import uvicorn

    from server.app import create_app, start_engine
    from server.connections import guarded_protocol

    app = create_app(settings, start=lambda settings, metrics: start_engine(settings, None, metrics, launched))
    _reserve_descriptors(settings.max_connections)
    # The guarded protocol bounds connections, header bytes and the time a request may take to arrive
    # (server/connections.py); uvicorn's own limit_concurrency is not used: it answers only after reading headers.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=args.access_log,
                            http=guarded_protocol(settings),
                            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)
    _run_draining(config, app.state.drain)
    return 0


def _serve_on_ray(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from server import ray_serve
    except ImportError as exc:
        raise SystemExit(f"--ray needs the ray extra: pip install 'reft-serve[ray]' ({exc})") from None
    gpus = args.replica_gpus if args.replica_gpus is not None else float((settings.device or "").startswith("cuda"))
    options = ray_serve.RayOptions(replicas=args.replicas, replica_cpus=args.replica_cpus, replica_gpus=gpus)
    return ray_serve.run(settings, options)


DESCRIPTOR_RESERVE = 256  # model and store files, SQLite, threads' wakeup pipes: what is not a connection


def _reserve_descriptors(max_connections: int) -> None:
    """Raise the soft open-files limit toward the hard one so `max_connections` sockets fit beside the rest;
    warn when even the hard limit is lower (connections beyond it would fail to be accepted, not get a 503)."""
    import resource

    needed = max_connections + DESCRIPTOR_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < needed:
        logging.getLogger("reft_serve.cli").warning(
            "open-files limit %d is below max_connections + %d; lower max_connections or raise `ulimit -n`",
            soft, DESCRIPTOR_RESERVE,
        )


def _run_draining(config: object, drain: Callable[[], None]) -> None:
    """Run uvicorn, but let SIGTERM/SIGINT first drain (readiness false, queued requests failed) before uvicorn's
    own graceful shutdown waits up to `timeout_graceful_shutdown` for running requests."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig in (signal.SIGTERM, signal.SIGINT):
                drain()
            super().handle_exit(sig, frame)

    DrainingServer(config).run()  # type: ignore[arg-type]


def setting_overrides(pairs: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Any `Settings` field from `REFT_SERVE_<FIELD>` in the environment, then from `--set field=value` (which
    wins; a dedicated flag such as --port wins over both). Values are validated by `Settings` itself; unknown
    names are an error, not silently ignored."""
    fields = set(Settings.model_fields) - {"admin_key"}  # the admin key has its own, safer routes in
    overrides = {name: environ[f"REFT_SERVE_{name.upper()}"] for name in fields if f"REFT_SERVE_{name.upper()}" in environ}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of: {', '.join(sorted(fields))}")
        overrides[name] = value
    return overrides


def _admin_key(args: argparse.Namespace) -> str | None:
    """From --admin-key-file, else $REFT_SERVE_ADMIN_KEY (never a plain flag: it would show in `ps`)."""
    if args.admin_key_file is not None:
        return args.admin_key_file.read_text().strip() or None
    return os.environ.get("REFT_SERVE_ADMIN_KEY") or None


def _admin(args: argparse.Namespace) -> int:
    """Tenants, keys and public flags, directly on the data directory (works with or without a running server)."""
    from adapters_store.tenants import open_tenants

    if args.action == "migrate":
        return _migrate(args)
    if args.store is None:
        _check_data_dir(args.data_dir, args.init)
    location = args.store if args.store is not None else args.data_dir
    tenants = open_tenants(location)
    if args.action == "create-tenant":
        limits = {k: v for k, v in (("requests_per_minute", args.requests_per_minute),
                                    ("tokens_per_minute", args.tokens_per_minute)) if v is not None}
        print(json.dumps(tenants.create_tenant(args.name, limits).to_dict()))
    elif args.action == "create-key":
        record, key = tenants.create_key(args.name)
        print(json.dumps({**record.to_dict(), "key": key}))
        print("store this key now: it is not shown again", file=sys.stderr)
    elif args.action == "revoke-key":
        print(json.dumps(tenants.revoke_key(args.name).to_dict()))
    elif args.action == "list":
        for tenant in tenants.list_tenants():
            keys = [k.to_dict() for k in tenants.list_keys(tenant.name)]
            print(json.dumps({**tenant.to_dict(), "keys": keys}))
    elif args.action == "set-public":
        backend = _store_backend(location)
        tenant, _, name = args.name.partition("/")
        if not name or not backend.set_public(tenant, name, not args.private):
            raise SystemExit(f"no intervention {args.name!r} (give it as tenant/name)")
        print(json.dumps({"intervention": args.name, "public": not args.private}))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Copy tenants, keys, every intervention version, training files and jobs from --from to --to, verifying every
    digest."""
    from dataclasses import asdict

    from adapters_store.migrate import migrate

    if not args.source or not args.destination:
        raise SystemExit("admin migrate needs --from URL and --to URL (sqlite:///dir or postgresql://...)")
    print(json.dumps({"migrated": asdict(migrate(args.source, args.destination)), "verified": True}))
    return 0


def _store_backend(location: Path | str) -> StoreBackend:
    """The artifact store's backend alone: admin commands need no model (records are not re-validated)."""
    from adapters_store.backend import is_postgres_url, sqlite_path
    from adapters_store.local import LocalBackend

    if is_postgres_url(location):
        from adapters_store.postgres.artifacts import PostgresBackend

        return PostgresBackend(str(location))
    return LocalBackend(sqlite_path(location) / "store")


def _check_data_dir(data_dir: Path, init: bool) -> None:
    """`admin` works on an existing data directory: a mistyped --data-dir must not quietly create an empty one (keys
    made there would never reach the server)."""
    if init or (data_dir / "tenants.sqlite3").exists() or (data_dir / "store").exists():
        return
    raise UserError(f"{data_dir} is not a reft-serve data directory (no tenants or store there): check --data-dir "
                    f"or ${DATA_DIR_ENV}, or pass --init to create one")


def _load(args: argparse.Namespace):  # noqa: ANN202 - BaseModel import is deferred (torch is slow to import)
    from reft_core.base_model import load_base_model

    return load_base_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.model_cache_dir)


def _generate(args: argparse.Namespace) -> int:
    from reft_core.artifact import load_artifact
    from reft_core.examples import encode_prompt
    from reft_core.generate import generate

    base = _load(args)
    intervention = None
    if args.intervention:
        intervention = load_artifact(args.intervention, base_model=base.fingerprint).intervention
    prompt_ids = encode_prompt(base.tokenizer, args.prompt, chat_template=not args.raw)
    [tokens] = generate(base.model, [prompt_ids], [intervention], max_new_tokens=args.max_tokens,
                        eos_token_id=base.tokenizer.eos_token_id, pad_token_id=base.tokenizer.pad_token_id)
    print(base.tokenizer.decode(tokens, skip_special_tokens=True))
    return 0


def _read_examples(path: Path) -> list:  # noqa: ANN202 - ExampleIn is imported late (the server's modules)
    """The examples file, parsed exactly as the server parses an uploaded one (the same forms, the same errors)."""
    from server.errors import APIError
    from server.jsonl import parse_examples

    try:
        return parse_examples(path.read_bytes(), TRAINING_EXAMPLES_CEILING)
    except APIError as exc:
        raise UserError(f"{path}: {exc.message}") from None


def _train_remote(args: argparse.Namespace) -> int:
    """Submit the job to a running server; follow its events with a progress bar unless --no-wait."""
    import httpx
    from tqdm import tqdm

    examples = [e.model_dump(exclude_none=True) for e in _read_examples(args.examples)]
    spec = {"rank": args.rank, "positions": args.positions, "type": args.type, "share_weights": args.share_weights}
    if args.layers:
        spec["layers"] = args.layers
    body = {
        "name": args.name, "examples": examples, "intervention": spec, "chat_template": not args.raw,
        "replace": args.replace,
        "hyperparameters": {"epochs": args.epochs, "learning_rate": args.lr, "batch_size": args.batch_size,
                            "seed": args.seed},
    }
    if args.validation:
        body["validation_examples"] = [e.model_dump(exclude_none=True) for e in _read_examples(args.validation)]
    base = args.server.rstrip("/")
    key = args.api_key or os.environ.get("REFT_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=httpx.Timeout(30, read=None), headers=headers) as client:
        response = client.post(f"{base}/v1/trainings", json=body)
        if response.status_code != 202:
            raise UserError(f"the server refused the job ({response.status_code}): {_error_message(response)}")
        job = response.json()
        if args.no_wait:
            print(json.dumps(job))
            return 0
        with tqdm(total=None, unit="step", desc=f"training {args.name}", file=sys.stderr) as bar, client.stream(
            "GET", f"{base}/v1/trainings/{job['id']}/events"
        ) as events:
            for line in events.iter_lines():
                if line.startswith("data: "):
                    job = _follow(job, json.loads(line[6:]), bar)
    print(json.dumps({k: job.get(k) for k in ("id", "status", "intervention", "result_version", "error")}))
    return 0 if job.get("status") == "succeeded" else 1


def _follow(job: dict, event: dict, bar) -> dict:  # noqa: ANN001 - tqdm is imported lazily
    """Apply one training event (server/training_events.py) to the job as the CLI shows it and to its progress bar."""
    kind = event.get("type")
    if kind == "snapshot":
        job = event["job"]
        progress = job.get("progress") or {}
        bar.total, bar.n = progress.get("total_steps"), progress.get("step", 0)
    elif kind == "status":
        job = {**job, **{k: v for k, v in event.items() if k in ("status", "result_version", "error")}}
        if event.get("total_steps"):
            bar.total = event["total_steps"]
    elif kind == "step":
        bar.n = event["step"]
        bar.set_postfix(loss=f"{event['loss']:.4f}", epoch=event["epoch"])
    elif kind == "epoch" and event.get("validation_loss") is not None:
        bar.write(f"epoch {event['epoch']}: validation loss {event['validation_loss']:.4f}")
    elif kind == "auto_stop":
        bar.total = bar.n  # stopped early: the bar ends here
        bar.write(f"stopped after epoch {event['epochs_run']} ({event['reason']}); kept epoch {event['kept_epoch']}")
    elif kind == "evaluation":
        job = {**job, "evaluation": event["evaluation"]}
    bar.refresh()
    return job


def _train(args: argparse.Namespace) -> int:
    if args.server:
        return _train_remote(args)
    from tqdm import tqdm

    from reft_core.artifact import save_artifact
    from reft_core.config import InterventionConfig
    from reft_core.examples import tokenize_examples
    from reft_core.recipe import default_layers
    from reft_core.trainer import TrainingConfig, train_intervention

    examples = _read_examples(args.examples)
    base = _load(args)
    layers = tuple(args.layers) if args.layers else default_layers(base.num_layers)
    config = InterventionConfig(layers=layers, rank=args.rank, positions=args.positions, type=args.type,
                                share_weights=args.share_weights)
    training = TrainingConfig(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)
    tokenized = tokenize_examples(base.tokenizer, [e.as_example() for e in examples], chat_template=not args.raw)
    validation = (tokenize_examples(base.tokenizer, [e.as_example() for e in _read_examples(args.validation)],
                                    chat_template=not args.raw) if args.validation else [])
    with tqdm(total=None, unit="step", desc=f"training {args.name}", file=sys.stderr) as bar:
        def progress(p) -> None:  # noqa: ANN001
            bar.total = p.total_steps
            bar.set_postfix(loss=f"{p.loss:.4f}", epoch=p.epoch)
            bar.update(1)
            if p.epoch_end is not None and p.epoch_end.validation_loss is not None:
                bar.write(f"epoch {p.epoch}: validation loss {p.epoch_end.validation_loss:.4f}")

        result = train_intervention(base.model, config, tokenized, training, on_progress=progress, validation=validation)
    output = args.output or Path(f"{args.name}.safetensors")
    metadata = result.metadata(training, len(examples))
    save_artifact(output, result.intervention, base.fingerprint, metadata)
    summary = {k: metadata[k] for k in ("validation_loss", "auto_stop") if k in metadata}
    print(json.dumps({"artifact": str(output), "final_loss": result.losses[-1], "seconds": round(result.duration_s, 1),
                      **summary}))
    return 0


def _import_pyreft(args: argparse.Namespace) -> int:
    from reft_core.artifact import save_artifact
    from reft_core.pyreft_import import import_pyreft

    base = _load(args)
    intervention = import_pyreft(args.directory, positions=args.positions)
    artifact = save_artifact(args.output, intervention, base.fingerprint, {"imported_from": "pyreft"})
    print(json.dumps({"artifact": str(args.output), "digest": artifact.digest}))
    return 0


def _epochs(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer or "auto", got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"epochs must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from reft_core import recipe  # torch-free: the train command's defaults

    parser = argparse.ArgumentParser(prog="reft-serve", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    parser.add_argument("--log-format", default="json", choices=LOG_FORMATS,
                        help="json: one object per line (for log collectors); text: for a terminal")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    serve = command("serve", "run the HTTP server")
    _add_model_args(serve)
    serve.add_argument("--model-id", help="name clients use for the bare model (default: the model's own id)")
    serve.add_argument("--host", help=_setting("host", "address to bind"))
    serve.add_argument("--port", type=int, help=_setting("port", "port to bind"))
    serve.add_argument("--data-dir", type=Path,
                       help=f"artifact store location (default: ${DATA_DIR_ENV}, else {default_data_dir()})")
    serve.add_argument("--max-running", type=int, help=_setting("max_running", "rows in the running batch"))
    serve.add_argument("--resident-interventions", type=int,
                       help=_setting("resident_interventions", "interventions kept in the bank"))
    serve.add_argument("--training-share", type=float, help=_setting(
        "training_share", "training time per engine iteration while serving, as a fraction of a decode step"))
    serve.add_argument("--store", help="sqlite:///dir or postgresql://user@host/db: where interventions, tenants, "
                       "keys and jobs live; replicas sharing one PostgreSQL database serve one registry "
                       "(default: --data-dir)")
    serve.add_argument("--limits-store", help="redis://host:port/db: per-tenant rate limits shared by replicas "
                       "(default: in memory, per process)")
    serve.add_argument("--auth", choices=["auto", "on", "off"],
                       help="require API keys (default: auto, which is on unless --host is a loopback address)")
    serve.add_argument("--admin-key-file", type=Path, help="file holding the admin key (default: $REFT_SERVE_ADMIN_KEY)")
    serve.add_argument("--request-timeout", type=float,
                       help=_setting("request_timeout_s", "seconds before a generation is cancelled"))
    serve.add_argument("--drain-timeout", type=float,
                       help=_setting("drain_timeout_s", "on SIGTERM, seconds running requests get to finish"))
    serve.add_argument("--otlp-endpoint", help="send OpenTelemetry traces to this OTLP/HTTP URL, e.g. "
                       "http://collector:4318/v1/traces (needs the otel extra; default: no tracing)")
    serve.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any server setting, e.g. --set requests_per_minute=120 (see README; also "
                            "REFT_SERVE_<FIELD> in the environment)")
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.add_argument("--ray", action="store_true",
                       help="run on Ray Serve: this app as the ingress, --replicas engine replicas (joins "
                            "$RAY_ADDRESS, else starts a local cluster; needs the ray extra, see docs/ray.md)")
    serve.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas (default 1)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="--ray: CPUs per engine replica (default 1)")
    serve.add_argument("--replica-gpus", type=float,
                       help="--ray: GPUs per engine replica (default 1 with --device cuda, else 0)")
    serve.set_defaults(run=_serve)

    gen = command("generate", "generate once, optionally with an intervention artifact")
    _add_model_args(gen)
    gen.add_argument("prompt", help="the prompt (a user turn in the chat template, unless --raw)")
    gen.add_argument("--intervention", type=Path, help="a .safetensors artifact")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(run=_generate)

    train = command("train", "train an intervention (locally, or on a running server with --server)")
    _add_model_args(train)
    train.add_argument("examples", type=Path,
                       help="JSONL, one example per line: {prompt, completion} or {messages} (as the server takes)")
    train.add_argument("--name", required=True, help="name of the intervention")
    train.add_argument("--output", type=Path, help="artifact path (default: NAME.safetensors)")
    # defaults: the one recipe (reft_core/recipe.py), the same as the HTTP API's
    train.add_argument("--layers", type=int, nargs="+", help="default: 8/30, 16/30 and 24/30 of the model's depth")
    train.add_argument("--rank", type=int, default=recipe.RANK, help="rank of each intervention")
    train.add_argument("--positions", default=recipe.POSITIONS, help="intervened positions: f<n>, l<n>, f<n>+l<n>")
    train.add_argument("--type", default=recipe.TYPE, choices=["loreft", "direft", "noreft"], help="intervention type")
    train.add_argument("--share-weights", action="store_true", default=recipe.SHARE_WEIGHTS,
                       help="one intervention for the first and last positions")
    train.add_argument("--epochs", type=_epochs, default=recipe.EPOCHS,
                       help='passes over the examples, or "auto": stop when the loss stops improving (at most '
                            f'{recipe.AUTO_MAX_EPOCHS})')
    train.add_argument("--lr", type=float, default=recipe.LEARNING_RATE, help="learning rate")
    train.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE, help="examples per optimizer step")
    train.add_argument("--seed", type=int, default=recipe.SEED, help="random seed")
    train.add_argument("--raw", action="store_true", help="do not apply the chat template to prompts")
    train.add_argument("--validation", type=Path,
                       help="JSONL of held-out examples: validation loss every epoch (and what --epochs auto watches)")
    train.add_argument("--server", help="URL of a running reft-serve: train there (the result is servable at once)")
    train.add_argument("--no-wait", action="store_true", help="with --server: print the queued job and exit")
    train.add_argument("--replace", action="store_true",
                       help="with --server: store a new version if the name exists (otherwise the server refuses)")
    train.add_argument("--api-key", help="with --server: API key (default: $REFT_SERVE_API_KEY)")
    train.set_defaults(run=_train)

    adm = command("admin", "manage tenants, API keys and public interventions on a data directory")
    adm.add_argument("action", choices=["create-tenant", "create-key", "revoke-key", "list", "set-public", "migrate"])
    adm.add_argument("name", nargs="?", default="",
                     help="tenant (create-tenant, create-key), key id (revoke-key), tenant/name (set-public)")
    adm.add_argument("--data-dir", type=Path, default=Path(os.environ.get(DATA_DIR_ENV) or default_data_dir()),
                     help=f"the server's data directory (default: ${DATA_DIR_ENV}, else {default_data_dir()})")
    adm.add_argument("--init", action="store_true", help="create the data directory if it does not exist yet")
    adm.add_argument("--store", help="sqlite:///dir or postgresql://...: the store a server uses (default: --data-dir)")
    adm.add_argument("--from", dest="source", help="migrate: the store to copy (sqlite:///dir or postgresql://...)")
    adm.add_argument("--to", dest="destination", help="migrate: the store to copy into (created if missing)")
    adm.add_argument("--requests-per-minute", type=int, help="create-tenant: override the server default")
    adm.add_argument("--tokens-per-minute", type=int, help="create-tenant: override the server default")
    adm.add_argument("--private", action="store_true", help="set-public: make it private again")
    adm.set_defaults(run=_admin)

    imp = command("import-pyreft", "convert a pyreft save directory into an artifact")
    _add_model_args(imp)
    imp.add_argument("directory", type=Path, help="a directory written by pyreft's save")
    imp.add_argument("--positions", default="l1", help="the positions the interventions were trained on")
    imp.add_argument("--output", type=Path, required=True, help="artifact path to write")
    imp.set_defaults(run=_import_pyreft)
    return parser


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line, without a traceback."""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("reft-serve")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _error_message(response: object) -> str:
    try:
        return str(response.json()["error"]["message"])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not our error body: show what came back
        return str(getattr(response, "text", response))[:500]


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's mistake raises: our own refusals, the libraries' typed input errors, files and settings."""
    from pydantic import ValidationError

    from adapters_store.errors import StoreError
    from reft_core.errors import ReftError

    return (UserError, ReftError, StoreError, ValidationError, OSError, json.JSONDecodeError, UnicodeDecodeError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError | NotADirectoryError):
        return f"{exc.filename}: {exc.strerror}"
    if type(exc).__name__ == "ValidationError":  # pydantic: one line per bad setting
        return "invalid setting: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                              for e in exc.errors())  # type: ignore[attr-defined]
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.run(args) or 0)
    except _user_errors() as exc:
        raise SystemExit(f"reft-serve {args.command}: error: {_describe(exc)}") from None


if __name__ == "__main__":
    raise SystemExit(main())
