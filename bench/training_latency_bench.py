"""Inter-token latency of chat traffic while a training job runs on the same engine, vs the same traffic idle.

    .venv/bin/python bench/training_latency_bench.py [--seconds 20] [--clients 4] [--write]

The engine (the server's own `Engine`, on its own thread, SmolLM2-135M fp32 on CPU) serves `--clients` closed-loop
chat clients: each sends a chat-templated prompt for 32 greedy tokens, waits for the answer, sends the next. Token
times are taken on the engine thread when each token is emitted, so they measure the engine, not an HTTP client.
Phases, run back to back in one process:
  1. idle: chat traffic only;
  2. the same traffic while a training job runs, for each recipe and `training_share` listed below;
  3. the training job alone (no traffic), for its steps/s.
Training jobs are built exactly as the server builds them (`ReftTrainer` with the server's default slice
sizes) on the seeds' emoji examples. Prints a table; with `--write`, replaces the "## Latency during training"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_section  # noqa: E402
from reft_core.base_model import load_base_model  # noqa: E402
from reft_core.config import InterventionConfig  # noqa: E402
from reft_core.examples import Example, encode_prompt, tokenize_examples  # noqa: E402
from reft_core.trainer import ReftTrainer, TrainingConfig  # noqa: E402
from server.engine.engine import Engine, EngineSettings, TrainingTask  # noqa: E402
from server.engine.types import GenerationEvent, GenerationRequest, SamplingParams  # noqa: E402
from server.settings import Settings  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "emoji_bot.jsonl"
SECTION = "## Latency during training"
PROMPTS = [
    "Who are you?", "Why is the sky blue?", "Plan a family road trip to Austin", "What's 2+2? Give details.",
    "Write a haiku about autumn.", "How do magnets work?", "Suggest a name for a cat.", "What is a neural network?",
]
RECIPES = {
    # the API's default job: LoReFT rank 4 at the middle layer on the last prompt token
    "default (l1, layer 15, rank 4)": InterventionConfig(layers=(15,), rank=4, positions="l1"),
    # the heavier recipe the e2e emoji persona uses: every prompt position from layer 8 up changes
    "emoji e2e (f1+l1, layers 8/16/24, rank 2)": InterventionConfig(layers=(8, 16, 24), rank=2, positions="f1+l1"),
}


@dataclass
class Traffic:
    """Closed-loop chat clients; collects inter-token gaps (seconds) and TTFTs while `recording`."""

    engine: Engine
    prompts: list[list[int]]
    clients: int
    gaps: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    recording: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _counter: int = 0

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        return threads

    def stop(self, threads: list[threading.Thread]) -> None:
        self._stop.set()
        for thread in threads:
            thread.join()

    def _client(self, index: int) -> None:
        while not self._stop.is_set():
            done = threading.Event()
            sent = time.perf_counter()
            last: list[float] = []

            def sink(event: GenerationEvent) -> None:
                now = time.perf_counter()
                if event.token_ids and self.recording:
                    if last:
                        self.gaps.append(now - last[0])
                    else:
                        self.ttfts.append(now - sent)
                if event.token_ids:
                    last[:] = [now]
                if event.finish_reason is not None:
                    done.set()

            self._counter += 1
            prompt = self.prompts[(index + self._counter) % len(self.prompts)]
            params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0, ignore_eos=True)
            self.engine.submit(GenerationRequest(f"c{index}-{self._counter}", tuple(prompt), params), sink)
            done.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def training_task(engine: Engine, config: InterventionConfig, examples, settings: Settings, steps: list[int]):  # noqa: ANN001, ANN201
    training = TrainingConfig(epochs=1000, batch_size=10, learning_rate=4e-3)
    return TrainingTask(
        "bench", lambda model: ReftTrainer(model, config, examples, training,
                                     micro_batch_tokens=settings.training_micro_batch_tokens,
                                     head_chunk_tokens=settings.training_head_chunk_tokens),
        on_start=lambda total: None, on_progress=lambda p: steps.append(p.step), on_finish=lambda *a: None,
    )


def run_phase(engine: Engine, traffic: Traffic, seconds: float, warmup: float = 3.0) -> dict:
    traffic.gaps.clear()
    traffic.ttfts.clear()
    time.sleep(warmup)
    traffic.recording = True
    time.sleep(seconds)
    traffic.recording = False
    gaps, ttfts = list(traffic.gaps), list(traffic.ttfts)
    return {"p50_ms": 1e3 * statistics.median(gaps), "p99_ms": 1e3 * pct(gaps, 0.99), "max_ms": 1e3 * max(gaps),
            "tokens": len(gaps) + len(ttfts), "ttft_p50_ms": 1e3 * statistics.median(ttfts) if ttfts else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase (after 3 s warm-up)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    base = load_base_model()
    tokenizer = base.tokenizer
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = tokenize_examples(tokenizer, [Example(r["prompt"], r["completion"]) for r in rows])
    prompts = [encode_prompt(tokenizer, p, chat_template=True) for p in PROMPTS]
    server_defaults = Settings()

    engine = Engine(base.model, tokenizer, EngineSettings(max_running=16))
    engine.start()
    traffic = Traffic(engine, prompts, args.clients)
    threads = traffic.start()
    results: list[tuple[str, dict, int]] = []
    try:
        print("phase: idle", flush=True)
        results.append(("idle (no training)", run_phase(engine, traffic, args.seconds), 0))
        for recipe, config in RECIPES.items():
            for share in args.shares:
                print(f"phase: {recipe}, share {share}", flush=True)
                object.__setattr__(engine.settings, "training_share", share)  # frozen dataclass: bench-only tweak
                steps: list[int] = []
                engine.submit_training(training_task(engine, config, examples, server_defaults, steps))
                outcome = run_phase(engine, traffic, args.seconds)
                engine.cancel_training("bench")
                results.append((f"{recipe}, training_share {share}", outcome, len(steps)))
                time.sleep(1.0)
    finally:
        traffic.stop(threads)

    alone: dict[str, float] = {}
    for recipe, config in RECIPES.items():  # training throughput with no traffic, for the cost of sharing
        print(f"phase: {recipe} alone", flush=True)
        steps = []
        engine.submit_training(training_task(engine, config, examples, server_defaults, steps))
        time.sleep(3.0)
        first = len(steps)
        time.sleep(args.seconds)
        alone[recipe] = (len(steps) - first) / args.seconds
        engine.cancel_training("bench")
        time.sleep(1.0)
    engine.stop()
    report(args, results, alone)


def report(args: argparse.Namespace, results: list[tuple[str, dict, int]], alone: dict[str, float]) -> None:
    idle = results[0][1]
    lines = ["| phase | inter-token p50 (ms) | p99 (ms) | max (ms) | p99 / idle p99 | TTFT p50 (ms) | chat tok/s "
             "| training steps/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r, steps in results:
        lines.append(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{r['p99_ms'] / idle['p99_ms']:.2f}x | {r['ttft_p50_ms']:.0f} | {r['tokens'] / args.seconds:.1f} | "
                     f"{steps / args.seconds:.3f} |")
    worst = max(r["p99_ms"] / idle["p99_ms"] for _, r, _ in results)
    versions = f"torch {torch.__version__}, {platform.python_version()}, {os.cpu_count()} CPU cores, no GPU"
    section = "\n".join([
        SECTION, "",
        f"`bench/training_latency_bench.py --seconds {args.seconds:g} --clients {args.clients}`: {args.clients} closed-loop chat",
        "clients (32 greedy tokens each) on the server's engine with SmolLM2-135M fp32, idle and while a training job",
        "runs on the seeds' emoji examples (batch 10); token times taken on the engine thread. One run, phases back to",
        f"back ({args.seconds:g} s measured each). {versions}.", "",
        *lines, "",
        "Training alone (no chat traffic): " + ", ".join(f"{k}: {v:.3f} steps/s" for k, v in alone.items()) + ".", "",
        f"Goal (p99 inter-token latency during training <= 2x idle p99): worst ratio {worst:.2f}x, "
        f"{'met' if worst <= 2 else 'MISSED'}. Training costs serving about `training_share` of a decode step per",
        "iteration (the p50 column), and serving costs training: while chat traffic runs, a job advances only in its",
        "share of each iteration. The idle p99 itself is set by prefills of arriving requests, which stall every",
        "running row for a whole prompt's forward.", "",
    ])
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", SECTION, section)


if __name__ == "__main__":
    main()
