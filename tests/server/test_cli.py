"""The `reft-serve` command on a tiny local model: train (progress bar with loss) -> artifact -> generate / import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reft_core.artifact import load_artifact
from reft_core.base_model import load_base_model
from server.cli import main
from tests import tiny
from tests.reft_core.test_pyreft_import import FIXTURES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


def test_train_writes_a_loadable_artifact_and_shows_progress(model_dir, tmp_path, capsys) -> None:
    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps({"prompt": f"hi {i}", "completion": "yo"}) for i in range(4)))
    output = tmp_path / "persona.safetensors"
    code = main(["train", str(examples), "--name", "persona", "--model", str(model_dir), "--layers", "1", "2",
                 "--rank", "2", "--epochs", "3", "--batch-size", "2", "--output", str(output)])
    captured = capsys.readouterr()
    assert code == 0 and "loss=" in captured.err and "6/6" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    artifact = load_artifact(output, base_model=load_base_model(model_dir, device="cpu").fingerprint)
    assert artifact.training["steps"] == 6 and artifact.training["final_loss"] == summary["final_loss"]
    assert artifact.intervention.config.layers == (1, 2)
    assert main(["generate", "hello", "--model", str(model_dir), "--intervention", str(output), "--max-tokens", "4"]) == 0


@pytest.mark.parametrize("text,expected", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "only a prompt"}\n', "bad.jsonl: line 2 of the examples file"),
    ('{"prompt": "a", "completion": "b"}\n\n{not json\n', "bad.jsonl: line 3 of the examples file"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1 .*assistant turn"),
    ("", "no examples"),
])
def test_bad_examples_file_is_a_clear_error(model_dir, tmp_path, text, expected) -> None:
    examples = tmp_path / "bad.jsonl"
    examples.write_text(text)
    with pytest.raises(SystemExit, match=expected):
        main(["train", str(examples), "--name", "x", "--model", str(model_dir)])


def test_train_takes_the_same_jsonl_forms_as_the_server(model_dir, tmp_path, capsys) -> None:
    """{prompt, completion} and {messages} lines in one file, as POST /v1/trainings/upload takes them."""
    examples = tmp_path / "mixed.jsonl"
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}]}
    examples.write_text("\n".join([json.dumps({"prompt": "hi 0", "completion": "yo"}), json.dumps(chat)]))
    output = tmp_path / "mixed.safetensors"
    assert main(["train", str(examples), "--name", "mixed", "--model", str(model_dir), "--layers", "1", "--rank", "2",
                 "--epochs", "1", "--batch-size", "2", "--output", str(output)]) == 0
    assert load_artifact(output).training["steps"] == 1 and capsys.readouterr().out


def test_the_chat_form_tokenizes_as_the_server_does() -> None:
    from reft_core.examples import ChatExample, encode_chat_prompt, tokenize_examples
    from server.training_request import ExampleIn

    tokenizer = tiny.tiny_tokenizer()
    example = ExampleIn(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    [tokenized] = tokenize_examples(tokenizer, [example.as_example()])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert list(tokenized.prompt_ids) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert list(tokenized.prompt_ids) == encode_chat_prompt(tokenizer, ChatExample((("user", "hi"), ("assistant", "yo"))))
    assert list(tokenized.completion_ids) == [*tokenizer("yo", add_special_tokens=False)["input_ids"],
                                              tokenizer.eos_token_id]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_the_cli_and_the_engine_launcher_import_no_torch() -> None:
    """`reft-serve serve` launches its engine process before importing torch and transformers, so that both
    processes import them at once; and `--help` or `admin` need neither."""
    check = ("import sys, server.cli, server.engine.launch; "
             "heavy = {'torch', 'transformers', 'fastapi'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_version_and_a_bad_flag_from_a_real_process() -> None:
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("reft-serve ")
    bad = _run("--log-level", "loud", "admin", "list")
    assert bad.returncode == 2 and "invalid choice: 'loud'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "{tmp}/missing.jsonl", "--name", "x"], "missing.jsonl: No such file or directory"),
    (["admin", "list", "--data-dir", "{tmp}/typo"], "is not a reft-serve data directory"),
    (["admin", "create-key", "ghost", "--data-dir", "{tmp}/data", "--init"], "tenant 'ghost' does not exist"),
    (["serve", "--model", "{tmp}/no-model"], "no such file or directory"),
    (["serve", "--set", "port=eighty"], "invalid setting: port"),
], ids=["missing-file", "no-data-dir", "unknown-tenant", "missing-model", "bad-setting"])
def test_user_mistakes_end_in_one_line_not_a_traceback(tmp_path, args, message) -> None:
    """SystemExit with a message: Python prints it as one line on stderr and exits 1, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in args])
    assert isinstance(exit_info.value.code, str) and message in exit_info.value.code
    assert "\n" not in exit_info.value.code and exit_info.value.code.startswith(f"reft-serve {args[0]}: error: ")
    assert not (tmp_path / "typo").exists()  # refused, not created empty


def test_admin_honours_the_data_dir_environment_variable(tmp_path, monkeypatch, capsys) -> None:
    data = tmp_path / "from-env"
    monkeypatch.setenv("REFT_SERVE_DATA_DIR", str(data))
    assert main(["admin", "create-tenant", "acme", "--init"]) == 0
    assert (data / "tenants.sqlite3").exists()
    capsys.readouterr()
    assert main(["admin", "list"]) == 0 and json.loads(capsys.readouterr().out)["name"] == "acme"


def test_help_shows_defaults() -> None:
    from reft_core import recipe
    from server.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    train, serve = commands["train"].format_help(), commands["serve"].format_help()
    assert "(default: 2)" in train and f"(default: {recipe.POSITIONS})" in " ".join(train.split())
    assert "(default: 8000)" in serve and "(default: 600.0)" in " ".join(serve.split())


def test_import_pyreft_command(tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny_llama", model_dir)
    tiny.tiny_tokenizer().save_pretrained(model_dir)  # the fixture model ships without a tokenizer
    output = tmp_path / "imported.safetensors"
    assert main(["import-pyreft", str(FIXTURES / "loreft_f1l1_noshare"), "--positions", "f1+l1", "--model",
                 str(model_dir), "--output", str(output)]) == 0
    assert json.loads(capsys.readouterr().out)["digest"].startswith("sha256:")
    assert load_artifact(output).intervention.config.positions == "f1+l1"


def test_train_on_a_running_server_waits_with_a_progress_bar(tmp_path, tiny_base, capsys) -> None:
    from server.app import create_app

    from .conftest import make_settings
    from .live import live_server

    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps({"prompt": f"hi {i}", "completion": "yo"}) for i in range(4)))
    app = create_app(make_settings(tmp_path), base_model=tiny_base)
    with live_server(app) as url:
        args = ["train", str(examples), "--name", "remote", "--server", url, "--layers", "1", "--rank", "2",
                "--epochs", "2", "--batch-size", "2"]
        assert main(args) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "succeeded"
        assert "loss=" in captured.err and "4/4" in captured.err
        with pytest.raises(SystemExit, match="409.*replace=true"):  # the name exists: never silently replaced
            main([*args, "--no-wait"])
        assert main([*args, "--no-wait", "--replace"]) == 0
        queued = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert queued["status"] == "queued" and queued["intervention"] == "remote"
        assert httpx_get(f"{url}/v1/interventions/remote")["source"] == "training"


def httpx_get(url: str) -> dict:
    import httpx

    return httpx.get(url).json()


def test_admin_commands_manage_tenants_keys_and_public_flags_on_the_data_dir(tmp_path, tiny_base, capsys) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app

    from .conftest import artifact_bytes, make_settings, persona

    data = str(tmp_path / "data")
    assert main(["admin", "create-tenant", "acme", "--requests-per-minute", "50", "--data-dir", data, "--init"]) == 0
    assert json.loads(capsys.readouterr().out)["limits"] == {"requests_per_minute": 50}
    assert main(["admin", "create-key", "acme", "--data-dir", data]) == 0
    created = json.loads(capsys.readouterr().out)
    headers = {"Authorization": f"Bearer {created['key']}"}
    settings = make_settings(tmp_path, auth="on", store=None)  # the data dir's store, what the admin commands wrote
    with TestClient(create_app(settings, base_model=tiny_base)) as client:
        files = {"file": ("a.safetensors", artifact_bytes(tiny_base, persona(1)))}
        assert client.post("/v1/interventions", data={"name": "bot"}, files=files, headers=headers).status_code == 201
        assert main(["admin", "set-public", "acme/bot", "--data-dir", data]) == 0
        assert client.get("/v1/interventions/bot", headers=headers).json()["public"] is True
        assert main(["admin", "revoke-key", created["id"], "--data-dir", data]) == 0
        assert client.get("/v1/models", headers=headers).status_code == 401
    capsys.readouterr()
    assert main(["admin", "list", "--data-dir", data]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["name"] == "acme" and listed["keys"][0]["revoked_at"] is not None
    assert "key" not in listed["keys"][0]


def test_any_setting_from_the_environment_or_set_with_flags_winning() -> None:
    from server.cli import setting_overrides
    from server.settings import Settings

    environ = {"REFT_SERVE_REQUESTS_PER_MINUTE": "120", "REFT_SERVE_PORT": "9000", "REFT_SERVE_ADMIN_KEY": "k"}
    overrides = setting_overrides(["port=9100", "max_waiting_requests=5"], environ)
    assert overrides == {"requests_per_minute": "120", "port": "9100", "max_waiting_requests": "5"}  # no admin key
    settings = Settings(**(overrides | {"port": 8001}))  # an explicit --port
    assert (settings.requests_per_minute, settings.port, settings.max_waiting_requests) == (120, 8001, 5)
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        setting_overrides(["no_such_limit=3"], {})
    with pytest.raises(SystemExit):
        setting_overrides(["port"], {})


def test_one_recipe_locally_on_a_server_and_over_http(model_dir, tmp_path, tiny_base, capsys) -> None:
    """With no settings given, `reft-serve train` (local and --server) and POST /v1/trainings train the same
    configuration (the recipe of reft_core/recipe.py, placed relative to the model's depth) into the same artifact:
    one digest for the same examples and seed."""
    import httpx

    from reft_core import recipe
    from server.app import create_app

    from .conftest import make_settings
    from .live import live_server

    examples = tmp_path / "examples.jsonl"
    rows = [{"prompt": f"hi {i}", "completion": "yo"} for i in range(4)]
    examples.write_text("\n".join(json.dumps(r) for r in rows))
    expected = {"layers": list(recipe.default_layers(tiny.LAYERS)), "rank": recipe.RANK,
                "positions": recipe.POSITIONS, "share_weights": recipe.SHARE_WEIGHTS, "type": recipe.TYPE}
    output = tmp_path / "local.safetensors"
    assert main(["train", str(examples), "--name", "local", "--model", str(model_dir), "--output", str(output)]) == 0
    local_artifact = load_artifact(output)
    local = local_artifact.intervention.config.to_dict()
    with live_server(create_app(make_settings(tmp_path), base_model=tiny_base)) as url:
        assert main(["train", str(examples), "--name", "remote", "--server", url]) == 0
        remote_record = httpx.get(f"{url}/v1/interventions/remote").json()
        remote = remote_record["config"]
        job = httpx.post(f"{url}/v1/trainings", json={"name": "plain", "examples": rows}).json()
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v1/trainings/{job['id']}").json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        plain_digest = httpx.get(f"{url}/v1/interventions/plain").json()["digest"]
    capsys.readouterr()
    assert local_artifact.digest == remote_record["digest"] == plain_digest
    for config in (local, remote, job["spec"]["intervention"]):
        assert {key: config[key] for key in expected} == expected, config
    hyper = job["spec"]["hyperparameters"]
    assert (hyper["epochs"], hyper["learning_rate"], hyper["batch_size"], hyper["seed"]) == (
        recipe.EPOCHS, recipe.LEARNING_RATE, recipe.BATCH_SIZE, recipe.SEED)
