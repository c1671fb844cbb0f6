"""The `reft-serve` command: run the server, train or import interventions locally, generate once, or manage
tenants and API keys (`admin`)."""

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

from server.logging_setup import configure_logging
from server.settings import Settings, default_data_dir

if TYPE_CHECKING:
    from adapters_store.backend import StoreBackend


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local HF model directory or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--dtype", help="bfloat16, float16, float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--model-cache-dir", type=Path, help="where converted GGUF models are cached")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.connections import guarded_protocol

    flags = dict(
        model=args.model, model_id=args.model_id, device=args.device, dtype=args.dtype, host=args.host,
        port=args.port, data_dir=args.data_dir, model_cache_dir=args.model_cache_dir,
        max_running=args.max_running, resident_interventions=args.resident_interventions,
        training_share=args.training_share, auth=args.auth, admin_key=_admin_key(args),
        request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout, store=args.store,
        limits_store=args.limits_store,
    )
    given = {name: value for name, value in flags.items() if value is not None}  # flags left out: settings default
    settings = Settings(**(setting_overrides(args.set, os.environ) | given))
    if args.ray:
        return _serve_on_ray(args, settings)
    app = create_app(settings)
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
    """Copy tenants, keys, every intervention version and jobs from --from to --to, verifying every digest."""
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


def _read_examples(path: Path) -> list:
    from reft_core.examples import Example

    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise SystemExit(f"{path}:{number}: each line must be {{\"prompt\": str, \"completion\": str}}")
        examples.append(Example(row["prompt"], row["completion"]))
    return examples


def _train_remote(args: argparse.Namespace) -> int:
    """Submit the job to a running server; follow its events with a progress bar unless --no-wait."""
    import httpx
    from tqdm import tqdm

    examples = [{"prompt": e.prompt, "completion": e.completion} for e in _read_examples(args.examples)]
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
        body["validation_examples"] = [{"prompt": e.prompt, "completion": e.completion}
                                       for e in _read_examples(args.validation)]
    base = args.server.rstrip("/")
    key = args.api_key or os.environ.get("REFT_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=httpx.Timeout(30, read=None), headers=headers) as client:
        response = client.post(f"{base}/v1/trainings", json=body)
        if response.status_code != 202:
            raise SystemExit(f"the server refused the job ({response.status_code}): {response.text}")
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
    tokenized = tokenize_examples(base.tokenizer, examples, chat_template=not args.raw)
    validation = (tokenize_examples(base.tokenizer, _read_examples(args.validation), chat_template=not args.raw)
                  if args.validation else [])
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

    parser = argparse.ArgumentParser(prog="reft-serve", description=__doc__)
    parser.add_argument("--log-level", default="info")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    _add_model_args(serve)
    serve.add_argument("--model-id", help="name clients use for the bare model (default: the model's own id)")
    serve.add_argument("--host", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--data-dir", type=Path, help=f"artifact store location (default {default_data_dir()})")
    serve.add_argument("--store", help="sqlite:///dir or postgresql://user@host/db: where interventions, tenants, "
                       "keys and jobs live; replicas sharing one PostgreSQL database serve one registry "
                       "(default: --data-dir)")
    serve.add_argument("--limits-store", help="redis://host:port/db: per-tenant rate limits shared by replicas "
                       "(default: in memory, per process)")
    serve.add_argument("--max-running", type=int, help="rows in the running batch (default 64)")
    serve.add_argument("--resident-interventions", type=int, help="interventions kept in the bank (default 256)")
    serve.add_argument("--training-share", type=float,
                       help="training time per engine iteration while serving, as a fraction of a decode step")
    serve.add_argument("--auth", choices=["auto", "on", "off"],
                       help="require API keys (auto: on unless --host is a loopback address)")
    serve.add_argument("--admin-key-file", type=Path, help="file holding the admin key (else $REFT_SERVE_ADMIN_KEY)")
    serve.add_argument("--request-timeout", type=float, help="seconds before a generation is cancelled (default 600)")
    serve.add_argument("--drain-timeout", type=float,
                       help="on SIGTERM, seconds running requests get to finish")
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

    gen = commands.add_parser("generate", help="generate once, optionally with an intervention artifact")
    _add_model_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--intervention", type=Path, help="a .safetensors artifact")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(run=_generate)

    train = commands.add_parser("train", help="train an intervention (locally, or on a running server with --server)")
    _add_model_args(train)
    train.add_argument("examples", type=Path, help="JSONL with {prompt, completion} per line")
    train.add_argument("--name", required=True)
    train.add_argument("--output", type=Path, help="artifact path (default: NAME.safetensors)")
    # defaults: the one recipe (reft_core/recipe.py), the same as the HTTP API's
    train.add_argument("--layers", type=int, nargs="+", help="default: 8/30, 16/30 and 24/30 of the model's depth")
    train.add_argument("--rank", type=int, default=recipe.RANK)
    train.add_argument("--positions", default=recipe.POSITIONS)
    train.add_argument("--type", default=recipe.TYPE, choices=["loreft", "direft", "noreft"])
    train.add_argument("--share-weights", action="store_true", default=recipe.SHARE_WEIGHTS)
    train.add_argument("--epochs", type=_epochs, default=recipe.EPOCHS,
                       help='a number, or "auto": stop when the loss stops improving (at most '
                            f'{recipe.AUTO_MAX_EPOCHS})')
    train.add_argument("--lr", type=float, default=recipe.LEARNING_RATE)
    train.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE)
    train.add_argument("--seed", type=int, default=recipe.SEED)
    train.add_argument("--raw", action="store_true", help="do not apply the chat template to prompts")
    train.add_argument("--validation", type=Path,
                       help="JSONL of held-out examples: validation loss every epoch (and what --epochs auto watches)")
    train.add_argument("--server", help="URL of a running reft-serve: train there (the result is servable at once)")
    train.add_argument("--no-wait", action="store_true", help="with --server: print the queued job and exit")
    train.add_argument("--replace", action="store_true",
                       help="with --server: store a new version if the name exists (otherwise the server refuses)")
    train.add_argument("--api-key", help="with --server: API key (default: $REFT_SERVE_API_KEY)")
    train.set_defaults(run=_train)

    adm = commands.add_parser("admin", help="manage tenants, API keys and public interventions on a data directory")
    adm.add_argument("action", choices=["create-tenant", "create-key", "revoke-key", "list", "set-public", "migrate"])
    adm.add_argument("name", nargs="?", default="",
                     help="tenant (create-tenant, create-key), key id (revoke-key), tenant/name (set-public)")
    adm.add_argument("--data-dir", type=Path, default=default_data_dir())
    adm.add_argument("--store", help="sqlite:///dir or postgresql://...: the store a server uses (default: --data-dir)")
    adm.add_argument("--from", dest="source", help="migrate: the store to copy (sqlite:///dir or postgresql://...)")
    adm.add_argument("--to", dest="destination", help="migrate: the store to copy into (created if missing)")
    adm.add_argument("--requests-per-minute", type=int, help="create-tenant: override the server default")
    adm.add_argument("--tokens-per-minute", type=int, help="create-tenant: override the server default")
    adm.add_argument("--private", action="store_true", help="set-public: make it private again")
    adm.set_defaults(run=_admin)

    imp = commands.add_parser("import-pyreft", help="convert a pyreft save directory into an artifact")
    _add_model_args(imp)
    imp.add_argument("directory", type=Path)
    imp.add_argument("--positions", default="l1")
    imp.add_argument("--output", type=Path, required=True)
    imp.set_defaults(run=_import_pyreft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
