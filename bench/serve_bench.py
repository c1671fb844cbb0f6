"""Serving benchmark: starts `reft-serve` on loopback and drives it over HTTP; prints a table, writes BENCHMARKS.md.

    .venv/bin/python bench/serve_bench.py [--quick]

Measured side by side in one run on one machine (ratios are what matter; absolute numbers are noisy here):
  1. aggregate tok/s and p50/p99 TTFT at 16 and 64 concurrent streaming requests, each request a different
     intervention, vs the same requests with no intervention, vs one shared intervention;
  2. the same prompts through HF static batched `generate` (no interventions), in-process;
  3. pyreft-style serving: one intervention set at a time, one request at a time (batch-1 prefill-intervened
     generation with the same weights, in-process), for the mixed-persona load;
  4. TTFT for a 512-token prompt with and without an intervention;
  5. hot swap under load: uploads/replacements while the 64-request load runs: upload-to-servable latency, failures.
Every request generates exactly `--tokens` tokens (`ignore_eos`, `min_tokens`), so token counts are equal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import reft_serve  # noqa: E402
from reft_core.artifact import encode_artifact  # noqa: E402
from reft_core.base_model import BaseModel, load_base_model  # noqa: E402
from reft_core.config import InterventionConfig  # noqa: E402
from reft_core.examples import encode_prompt  # noqa: E402
from reft_core.generate import generate  # noqa: E402
from reft_core.intervention import Intervention, UnitWeights  # noqa: E402

PROMPTS = [
    "Who are you?", "Why is the sky blue?", "Plan a family road trip to Austin", "What's 2+2? Give details.",
    "Write a haiku about autumn.", "How do magnets work?", "Suggest a name for a cat.", "What is a neural network?",
]


def random_persona(hidden: int, seed: int) -> Intervention:
    rng = random.Random(seed)
    config = InterventionConfig(
        layers=tuple(sorted(rng.sample(range(4, 20), rng.choice([1, 2])))), rank=rng.choice([2, 4, 8]),
        positions=rng.choice(["l1", "f1+l1"]), share_weights=rng.random() < 0.5,
    )
    generator = torch.Generator().manual_seed(seed)
    units = {}
    for unit in config.units():
        q, _ = torch.linalg.qr(torch.randn(hidden, config.rank, generator=generator))
        units[unit] = UnitWeights(q.T.contiguous(), 0.05 * torch.randn(config.rank, hidden, generator=generator),
                                  0.5 * torch.randn(config.rank, generator=generator))
    return Intervention(config, hidden, units)


@dataclass
class RequestResult:
    ok: bool
    ttft: float
    latency: float
    tokens: int


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "min_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, generated = None, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(False, 0.0, 0.0, 0)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, 0.0, 0.0, 0)
                if chunk.get("usage"):
                    generated = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - started
    except httpx.HTTPError:
        return RequestResult(False, 0.0, 0.0, 0)
    return RequestResult(True, ttft or 0.0, time.perf_counter() - started, generated)


async def load(url: str, models: list[str], tokens: int) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=len(models) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, m, PROMPTS[i % len(PROMPTS)], tokens) for i, m in enumerate(models)))
    return list(results), time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(name: str, results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    return {"scenario": name, "requests": len(results), "failed": len(results) - len(ok),
            "tok_s": sum(r.tokens for r in ok) / wall, "ttft_p50": pct([r.ttft for r in ok], 0.5),
            "ttft_p99": pct([r.ttft for r in ok], 0.99)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (its TTFTs come with it); failures are summed over all runs."""
    chosen = dict(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2])
    chosen["failed"] = sum(r["failed"] for r in runs)
    return chosen


def hf_static(base: BaseModel, count: int, tokens: int) -> dict:
    tok = base.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(count)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    with torch.inference_mode():
        out = base.model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - started
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * count
    return {"scenario": f"HF static batch generate, {count} prompts, no intervention", "requests": count, "failed": 0,
            "tok_s": generated / wall, "ttft_p50": float("nan"), "ttft_p99": float("nan")}


def pyreft_style(base: BaseModel, personas: list[Intervention], count: int, tokens: int) -> dict:
    """One intervention set loaded at a time, one request at a time (how pyreft serves)."""
    started, ttfts = time.perf_counter(), []
    for i in range(count):
        ids = encode_prompt(base.tokenizer, PROMPTS[i % len(PROMPTS)], chat_template=True)
        t0 = time.perf_counter()
        generate(base.model, [ids], [personas[i % len(personas)]], max_new_tokens=1)
        ttfts.append(time.perf_counter() - t0)
        generate(base.model, [ids], [personas[i % len(personas)]], max_new_tokens=tokens)
    wall = time.perf_counter() - started - sum(ttfts)  # exclude the extra TTFT probes from the wall time
    return {"scenario": f"pyreft-style: one request at a time, {count} mixed personas", "requests": count,
            "failed": 0, "tok_s": count * tokens / wall, "ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99)}


def long_prompt_ttft(url: str, models: tuple[str, str], repeats: int) -> tuple[float, float]:
    """Median time to the first token of a ~512-token prompt, alternating the two models to cancel drift."""
    filler = " ".join(["The quick brown fox jumps over the lazy dog."] * 50)
    times: dict[str, list[float]] = {m: [] for m in models}
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(repeats):
            for model in models:
                body = {"model": model, "prompt": filler, "max_tokens": 1, "temperature": 0}
                t0 = time.perf_counter()
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200
                times[model].append(time.perf_counter() - t0)
        assert 500 <= response.json()["usage"]["prompt_tokens"] <= 530
    return statistics.median(times[models[0]]), statistics.median(times[models[1]])


def hot_swap_during_load(url: str, base: BaseModel, names: list[str], tokens: int) -> dict:
    swaps: list[float] = []

    uploads: list[float] = []

    def swapper() -> None:
        """Upload or replace while the load runs; servable = first token of a request on the new version."""
        with httpx.Client(base_url=url, timeout=300) as client:
            time.sleep(1.0)
            for i in range(8):
                name = f"swap-{i}" if i % 2 == 0 else names[i]
                payload, _ = encode_artifact(random_persona(base.hidden_size, 10_000 + i), base.fingerprint)
                t0 = time.perf_counter()
                files = {"file": ("a.safetensors", payload)}
                response = (client.post("/v1/interventions", data={"name": name}, files=files) if i % 2 == 0
                            else client.put(f"/v1/interventions/{name}", files=files))
                assert response.status_code in (200, 201), response.text
                uploads.append(time.perf_counter() - t0)
                body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                swaps.append(time.perf_counter() - t0)

    thread = threading.Thread(target=swapper)
    thread.start()
    results, wall = asyncio.run(load(url, names, tokens))
    thread.join()
    row = summarize(f"hot swap: 8 uploads/replacements during the {len(names)}-request load", results, wall)
    row["swap_p50"], row["swap_max"] = statistics.median(swaps), max(swaps)
    row["upload_p50"], row["upload_max"] = statistics.median(uploads), max(uploads)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smaller run for a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per scenario (median reported)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    sizes = [4] if args.quick else [16, 64]
    base = load_base_model(device="cpu", dtype="float32")
    personas = [random_persona(base.hidden_size, seed) for seed in range(max(sizes))]

    data_dir = Path(tempfile.mkdtemp(prefix="reft-bench-"))
    rows: list[dict] = []
    with reft_serve(data_dir, "--max-running", str(max(sizes) + 8)) as (_, url):
        with httpx.Client(base_url=url, timeout=120) as client:
            for i, persona in enumerate(personas):
                payload, _ = encode_artifact(persona, base.fingerprint)
                assert client.post("/v1/interventions", data={"name": f"p{i}"},
                                   files={"file": ("p.safetensors", payload)}).status_code == 201
        # warm-up: every persona resident in the bank and decoded in the registry, as in steady-state serving
        asyncio.run(load(url, [base.model_id] + [f"p{i}" for i in range(len(personas))], 1))
        for size in sizes:
            scenarios = {"every request a different intervention": [f"p{i}" for i in range(size)],
                         "no intervention": [base.model_id] * size, "one shared intervention": ["p0"] * size}
            runs: dict[str, list[dict]] = {label: [] for label in scenarios}
            for _ in range(args.repeats):  # interleaved rounds: slow drifts of this shared machine hit all alike
                for label, models in scenarios.items():
                    results, wall = asyncio.run(load(url, models, args.tokens))
                    runs[label].append(summarize(f"reft-serve, {size} concurrent, {label}", results, wall))
            for label in scenarios:
                rows.append(median_run(runs[label]))
                print(rows[-1], flush=True)
        ttft_plain, ttft_steered = long_prompt_ttft(url, (base.model_id, "p0"), 3 if args.quick else 11)
        swap = hot_swap_during_load(url, base, [f"p{i}" for i in range(max(sizes))], args.tokens)
        print(swap, flush=True)
    for size in sizes:
        rows.append(median_run([hf_static(base, size, args.tokens) for _ in range(args.repeats)]))
        print(rows[-1], flush=True)
    pyreft_count = 4 if args.quick else 16
    rows.append(pyreft_style(base, personas, pyreft_count, args.tokens))
    print(rows[-1], flush=True)
    write_report(args, rows, sizes, ttft_plain, ttft_steered, swap)


def write_report(args, rows, sizes, ttft_plain, ttft_steered, swap) -> None:  # noqa: ANN001
    by = {r["scenario"]: r for r in rows}
    fmt = lambda x: "–" if x != x else f"{x:.2f}"  # noqa: E731 - NaN shows as a dash
    lines = ["| scenario | requests | failed | tok/s | TTFT p50 (s) | TTFT p99 (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['requests']} | {r['failed']} | {r['tok_s']:.1f} | {fmt(r['ttft_p50'])} | "
              f"{fmt(r['ttft_p99'])} |" for r in rows]
    ratios = []
    for size in sizes:
        mixed = by[f"reft-serve, {size} concurrent, every request a different intervention"]
        none = by[f"reft-serve, {size} concurrent, no intervention"]
        hf = by[f"HF static batch generate, {size} prompts, no intervention"]
        ratios.append(f"| {size} distinct interventions vs none (goal >= 0.97) | {mixed['tok_s'] / none['tok_s']:.3f} |")
        ratios.append(f"| {size} concurrent, no intervention, vs HF static batch (goal >= 1.0) | "
                      f"{none['tok_s'] / hf['tok_s']:.2f} |")
    pyreft_row = next(r for r in rows if r["scenario"].startswith("pyreft-style"))
    biggest = by[f"reft-serve, {sizes[-1]} concurrent, every request a different intervention"]
    ratios.append(f"| {sizes[-1]} mixed personas vs pyreft-style serving (goal >= 5) | "
                  f"{biggest['tok_s'] / pyreft_row['tok_s']:.1f} |")
    ratios.append(f"| TTFT of a 512-token prompt, intervention vs none (goal <= 1.02) | {ttft_steered / ttft_plain:.3f} "
                  f"({ttft_steered:.3f} s vs {ttft_plain:.3f} s) |")
    ratios.append(f"| hot swap under the {sizes[-1]}-request load: upload (201) p50 / max (s) | "
                  f"{swap['upload_p50']:.2f} / {swap['upload_max']:.2f} |")
    ratios.append(f"| hot swap: upload-to-servable (first token on the new version) p50 / max (s) | "
                  f"{swap['swap_p50']:.2f} / {swap['swap_max']:.2f} |")
    ratios.append(f"| failed requests during the swaps (goal 0) | {swap['failed']} |")
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                f"transformers {__import__('transformers').__version__}; {platform.machine()}, "
                f"{os.cpu_count()} CPU cores, no GPU; SmolLM2-135M-Instruct fp32")
    report = "\n".join([
        "# Benchmarks", "",
        "Serving benchmark from `bench/serve_bench.py`: the server runs as a separate process on loopback and is",
        "driven over HTTP with streaming requests; baselines run in-process on the same machine right after.",
        f"Every request asks for exactly {args.tokens} new tokens (`min_tokens` + `ignore_eos`). Each reft-serve and HF",
        f"row is the median of {args.repeats} runs (reft-serve scenarios interleaved round by round). Personas are random",
        "LoReFT interventions of varied layers (4–19), ranks (2/4/8) and positions (`l1`, `f1+l1`).", "",
        f"Machine and versions: {versions}.", "",
        f"Command: `.venv/bin/python bench/serve_bench.py{' --quick' if args.quick else ''}`", "",
        "## Results", "", *lines, "", "## Ratios (side by side, same run)", "", "| comparison | value |", "|---|---|",
        *ratios, "",
    ])
    # keep sections other benchmarks maintain (bench/train_bench.py's "## Training" table)
    previous = args.output.read_text() if args.output.exists() else ""
    kept = previous[previous.index("## Training"):] if "## Training" in previous else ""
    args.output.write_text(report + ("\n" + kept if kept else ""))
    print(report)


if __name__ == "__main__":
    main()
