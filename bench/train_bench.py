"""Training benchmark: our trainer vs pyreft on the same recipe, data, model and machine, side by side.

    .venv/bin/python bench/train_bench.py [--epochs 100]

The recipe is the seeds' emoji bot on the embedded SmolLM2-135M (fp32, CPU): 10 examples, chat-templated prompts,
LoReFT rank 4 at layer 8 on the last prompt token, lr 4e-3, batch 10, loss on completion + EOS. pyreft runs in its
own throw-away venv (`bench/.pyreft-venv`, created on first use: pyreft 0.1.0 pins transformers 4.45) on a copy of
the converted model whose config/tokenizer files are rewritten for transformers 4.45. Both get the same prompt
strings (templated here). Prints wall time, seconds per step and final loss for each, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reft_core.base_model import load_base_model  # noqa: E402
from reft_core.config import InterventionConfig  # noqa: E402
from reft_core.examples import Example, render_prompt, tokenize_examples  # noqa: E402
from reft_core.trainer import TrainingConfig, train_intervention  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "emoji_bot.jsonl"
VENV = ROOT / "bench" / ".pyreft-venv"
PYREFT_PACKAGES = ["torch==2.13.0", "transformers==4.45.1", "accelerate", "sentencepiece", "protobuf", "matplotlib",
                   "scikit-learn", "datasets<4", "huggingface-hub<1.0"]

PYREFT_SCRIPT = r'''
import json, sys, time, torch, transformers, pyreft
job = json.load(open(sys.argv[1]))
torch.manual_seed(job["seed"])
model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], torch_dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(job["model_dir"])
config = pyreft.ReftConfig(representations={"layer": job["layer"], "component": "block_output",
    "low_rank_dimension": job["rank"], "intervention": pyreft.LoreftIntervention(
        embed_dim=model.config.hidden_size, low_rank_dimension=job["rank"], dtype=torch.float32)})
reft_model = pyreft.get_reft_model(model, config)
data = pyreft.make_last_position_supervised_data_module(tokenizer, model, job["prompts"], job["completions"])
args = transformers.TrainingArguments(output_dir=job["out"], num_train_epochs=job["epochs"], learning_rate=job["lr"],
    per_device_train_batch_size=job["batch_size"], logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    seed=job["seed"])
trainer = pyreft.ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=args, **data)
start = time.perf_counter()
trainer.train()
wall = time.perf_counter() - start
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"wall_s": wall, "steps": trainer.state.global_step, "final_loss": losses[-1]}))
'''


def ensure_pyreft_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PYREFT_PACKAGES], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "pyvene==0.1.8", "pyreft==0.1.0"],
                       check=True)
    return python


def legacy_model_dir(model_dir: Path, target: Path) -> Path:
    """The converted model, with config/tokenizer files that transformers 4.45 reads (weights are linked)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        (target / name).symlink_to(model_dir / name)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters", {}).get("rope_theta", 10000.0)
    config["torch_dtype"] = config.pop("dtype", "float32")
    (target / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_max_length"] = 2048  # pyreft truncates to this; the v5 "infinite" value overflows
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = [Example(r["prompt"], r["completion"]) for r in rows]
    base = load_base_model(device="cpu", dtype="float32")
    recipe = InterventionConfig(layers=(8,), rank=4, positions="l1")
    training = TrainingConfig(epochs=args.epochs, learning_rate=4e-3, batch_size=10, seed=42)

    started = time.perf_counter()
    ours = train_intervention(base.model, recipe, tokenize_examples(base.tokenizer, examples), training)
    ours_wall = time.perf_counter() - started

    python = ensure_pyreft_venv()
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "model_dir": str(legacy_model_dir(base.model_dir, Path(tmp) / "model")), "out": str(Path(tmp) / "out"),
            "prompts": [render_prompt(base.tokenizer, e.prompt, chat_template=True) for e in examples],
            "completions": [e.completion for e in examples], "layer": 8, "rank": 4, "lr": 4e-3, "batch_size": 10,
            "epochs": args.epochs, "seed": 42,
        }
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "run.py").write_text(PYREFT_SCRIPT)
        done = subprocess.run([str(python), str(Path(tmp) / "run.py"), str(Path(tmp) / "job.json")],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    result_lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not result_lines:
        raise SystemExit(f"pyreft run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    theirs = json.loads(result_lines[-1][len("RESULT "):])
    steps = len(ours.losses)
    print("| trainer | epochs | steps | wall (s) | s/step | final loss |\n|---|---|---|---|---|---|")
    print(f"| reft-serve | {args.epochs} | {steps} | {ours_wall:.1f} | {ours_wall / steps:.2f} | {ours.losses[-1]:.4f} |")
    print(f"| pyreft 0.1.0 | {args.epochs} | {theirs['steps']} | {theirs['wall_s']:.1f} | "
          f"{theirs['wall_s'] / theirs['steps']:.2f} | {theirs['final_loss']:.4f} |")
    print(f"\nspeed-up (pyreft wall / ours): {theirs['wall_s'] / ours_wall:.2f}x")


if __name__ == "__main__":
    main()
