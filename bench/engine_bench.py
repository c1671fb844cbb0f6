"""Engine benchmark (issue: beat static batching): reft-serve over HTTP against HF `generate` in-process, same
prompts, same run; the engine in its own process vs on a thread beside the event loop; a small profile.

    .venv/bin/python bench/engine_bench.py [--rounds 3] [--write]
    .venv/bin/python bench/engine_bench.py --only-composed [--rounds 3] [--write]   # composed personas alone

Scenarios (greedy, no interventions unless said; every request generates exactly its `max_tokens`):
  fixed: 64 concurrent streaming requests x 64 tokens, vs HF static batched `generate` of the same 64 prompts;
  mixed: 16 concurrent requests with output lengths 16..128 (seeded), vs HF static batching, which must decode
         every row to the longest; both count only the tokens the requests asked for;
  mixed, 16 clients: 16 clients each sending 4 requests one after another (64 requests, 16..128 tokens, seeded):
         what a server sees when clients keep coming back. Static batching serves them as 4 batches of 16, each
         decoded to its longest request (the clients of a batch all get their answers when its longest is done, and
         come back together); the engine refills a row as soon as its request ends.
The engine is also driven in-process without HTTP (`Engine.run_until_idle`, same requests, the same clients loop),
which separates what the engine does from what serving over HTTP on the same two cores costs.
Each is run with the engine in its own process (the default) and on a thread in the API process
(`--set engine_process=false`), rounds interleaved, medians reported. The profile reads the server's own
`reft_decode_step_seconds` (time inside the decode forward) against wall time per step, and times
`ModelRunner.decode` at batch 64 in-process.

Composed personas (`--only-composed`, also part of a full run): the fixed workload on one server with 16 random
personas, every request with an intervention: one (`pN`), two composed that overlap where their layers meet
(`pN+pM`), and two that overlap everywhere (`pN+pN`, an extra bank stage at every intervened layer); rounds
interleave the three; goal: composing 2 costs <= 3% throughput vs 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import reft_serve, write_section  # noqa: E402
from bench.serve_bench import PROMPTS, long_prompt_ttft, random_persona  # noqa: E402
from reft_core.artifact import encode_artifact  # noqa: E402
from reft_core.base_model import BaseModel, load_base_model  # noqa: E402
from reft_core.bank import InterventionBank  # noqa: E402
from reft_core.examples import encode_prompt  # noqa: E402
from server.engine.engine import Engine, EngineSettings  # noqa: E402
from server.engine.runner import ModelRunner, PrefillRow  # noqa: E402
from server.engine.types import GenerationEvent, GenerationRequest, SamplingParams  # noqa: E402
from server.metrics import Metrics  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
MODES = {"engine process": [], "engine thread": ["--set", "engine_process=false"],
         "engine process, speculative": ["--set", "speculative_tokens=4"]}
STALL_MODES = {"chunked prefill": [], "prefill in one forward": ["--set", "prefill_chunk_share=0"]}


def mixed_lengths(count: int = 16, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(16, 128) for _ in range(count)]


@dataclass(frozen=True)
class Workload:
    lengths: list[int]  # output tokens of each request, in the order clients send them
    clients: int  # concurrent clients; each sends its next request when the previous one is answered

    def batches(self) -> list[list[int]]:
        """What static batching serves: the clients' requests in groups of `clients`, one after another."""
        return [self.lengths[i : i + self.clients] for i in range(0, len(self.lengths), self.clients)]


WORKLOADS = {
    "fixed": Workload([64] * 64, clients=64),
    "mixed": Workload(mixed_lengths(), clients=16),
    "mixed, 16 clients": Workload(mixed_lengths(64, seed=1), clients=16),
}
GOALS = {"fixed": 1.0, "mixed": 1.3, "mixed, 16 clients": 1.3}


async def _request(client: httpx.AsyncClient, prompt: str, tokens: int, model: str = MODEL) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "min_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    generated = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    generated = chunk["usage"]["completion_tokens"]
    return generated


async def _load(url: str, lengths: list[int], models: list[str] | None = None,
                clients: int | None = None) -> tuple[int, float]:
    """`clients` concurrent clients (default: one per request) work through the requests in order, each sending
    its next one when the previous is answered; (tokens generated, wall seconds)."""
    clients = clients or len(lengths)
    models = models or [MODEL] * len(lengths)
    counts = [0] * len(lengths)
    queue = iter(range(len(lengths)))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in queue:  # one shared iterator: each index is taken by exactly one client
            counts[i] = await _request(client, PROMPTS[i % len(PROMPTS)], lengths[i], models[i])

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    wall = time.perf_counter() - started
    assert counts == lengths, "every request must generate exactly its max_tokens"
    return sum(counts), wall


async def _stream_gaps(client: httpx.AsyncClient, prompt: str, tokens: int) -> list[float]:
    """Seconds between consecutive content chunks of one streamed request (after its first)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "min_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    arrivals: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                arrivals.append(time.perf_counter())
    return [b - a for a, b in zip(arrivals[1:], arrivals[2:])]


async def _stall(url: str, rows: int = 16, tokens: int = 96, long_tokens: int = 2000) -> dict:
    """`rows` streams decode; a `long_tokens` prompt arrives once they all stream. Their inter-token gaps."""
    filler = ("The quick brown fox jumps over the lazy dog near the quiet river bank. " * 133)  # ~2,000 tokens
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=rows + 8)) as client:
        streams = [asyncio.create_task(_stream_gaps(client, PROMPTS[i % len(PROMPTS)], tokens)) for i in range(rows)]
        await asyncio.sleep(3.0)
        long = await client.post("/v1/completions", json={"model": MODEL, "prompt": filler, "max_tokens": 1})
        assert long.status_code == 200, long.text
        prompt_tokens = long.json()["usage"]["prompt_tokens"]
        gaps = [g for s in await asyncio.gather(*streams) for g in s]
    ordered = sorted(gaps)
    p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50": p50, "p99": p99, "prompt_tokens": prompt_tokens}


def _decode_step_stats(url: str) -> tuple[float, int]:
    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"^reft_decode_step_seconds_sum (\S+)$", text, re.M).group(1))
    count = int(float(re.search(r"^reft_decode_step_seconds_count (\S+)$", text, re.M).group(1)))
    return total, count


def serve_round(mode: str, data_dir: Path, workloads: dict[str, Workload]) -> dict[str, dict]:
    results = {}
    with reft_serve(data_dir, *MODES[mode]) as (_server, url):
        asyncio.run(_load(url, [4] * 8))  # warm-up
        for name, workload in workloads.items():
            before = _decode_step_stats(url)
            tokens, wall = asyncio.run(_load(url, workload.lengths, clients=workload.clients))
            after = _decode_step_stats(url)
            steps = after[1] - before[1]
            results[name] = {"tok_s": tokens / wall, "wall": wall, "steps": steps,
                             "forward_s": (after[0] - before[0]) / max(steps, 1), "step_wall_s": wall / max(steps, 1)}
    return results


def hf_static(base: BaseModel, lengths: list[int], clients: int | None = None) -> dict:
    """HF batched generate over the same prompts, in batches of `clients` (default: all at once), one after
    another; every row of a batch decodes to the batch's longest request (static batching)."""
    workload = Workload(lengths, clients or len(lengths))
    tok = base.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(len(lengths))]
    started = time.perf_counter()
    done = 0
    for batch_lengths in workload.batches():
        batch = tok(texts[done : done + len(batch_lengths)], return_tensors="pt", padding=True, add_special_tokens=False)
        longest = max(batch_lengths)
        with torch.inference_mode():
            base.model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        done += len(batch_lengths)
    wall = time.perf_counter() - started
    return {"tok_s": sum(lengths) / wall, "wall": wall}


def engine_in_process(base: BaseModel, workload: Workload) -> dict:
    """The engine alone, no HTTP: `Engine.run_until_idle` over the same requests, `clients` at a time, each
    client's next request submitted when its previous one ends (from the sink, on the engine's own loop)."""
    engine = Engine(base.model, base.tokenizer, EngineSettings(), Metrics())
    requests = [GenerationRequest(f"r{i}", tuple(encode_prompt(base.tokenizer, PROMPTS[i % len(PROMPTS)],
                                                               chat_template=True)),
                                  SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True))
                for i, n in enumerate(workload.lengths)]
    counts = [0] * len(requests)
    pending = iter(range(workload.clients, len(requests)))

    def sink_for(i: int):
        def sink(event: GenerationEvent) -> None:
            counts[i] += len(event.token_ids)
            if event.finish_reason is not None and (following := next(pending, None)) is not None:
                engine.submit(requests[following], sink_for(following))
        return sink

    started = time.perf_counter()
    engine.run_until_idle((requests[i], sink_for(i)) for i in range(min(workload.clients, len(requests))))
    wall = time.perf_counter() - started
    assert counts == workload.lengths, "every request must generate exactly its max_tokens"
    return {"tok_s": sum(counts) / wall, "wall": wall}


def runner_decode_step(base: BaseModel, rows: int = 64, steps: int = 8) -> float:
    """Mean in-process `ModelRunner.decode` time at `rows` rows (the forward alone, nothing around it)."""
    bank = InterventionBank(hidden_size=base.hidden_size, num_layers=base.num_layers, num_slots=1)
    runner = ModelRunner(base.model, bank, base.tokenizer.pad_token_id)
    prompts = [encode_prompt(base.tokenizer, PROMPTS[i % len(PROMPTS)], chat_template=True) for i in range(rows)]
    logits = runner.prefill([PrefillRow(i, p, 0) for i, p in enumerate(prompts)])
    tokens = logits.argmax(-1).tolist()
    started = time.perf_counter()
    for _ in range(steps):
        tokens = runner.decode(tokens).argmax(-1).tolist()
    return (time.perf_counter() - started) / steps


def long_row_steps(base: BaseModel, rows: int = 16, long_tokens: int = 1800, rounds: int = 6,
                   steps: int = 4) -> list[str]:
    """Decode step time and KV cache bytes of `rows` chat rows, alone and beside long rows: one long row in the slot
    cache (every slot as wide as it) and in the long rows' own cache (the default); 32 long rows of similar lengths
    (a RAG-like batch) each with its own attention call, and as one group (the default). In-process, the forward
    alone; every batch is built first, then timed in alternating rounds (medians)."""
    bank = InterventionBank(hidden_size=base.hidden_size, num_layers=base.num_layers, num_slots=1)
    prompts = [encode_prompt(base.tokenizer, PROMPTS[i % len(PROMPTS)], chat_template=True) for i in range(rows)]
    long_prompt = encode_prompt(base.tokenizer, " ".join(["The quick brown fox jumps over the lazy dog."]
                                                         * (long_tokens // 10)), chat_template=False)
    many = [long_prompt[: 520 + 5 * i] for i in range(32)]

    def build(case: str) -> ModelRunner:
        slack = 0.0 if case == "pieces" else float("inf")
        runner = ModelRunner(base.model, bank, base.tokenizer.pad_token_id, long_group_slack=slack)
        runner.prefill([PrefillRow(i, p, 0) for i, p in enumerate(prompts)])
        if case == "slot cache":
            runner.prefill([PrefillRow(rows, long_prompt, 0)])
        elif case != "none":
            for i, prompt in enumerate([long_prompt] if case == "own cache" else many):
                runner.begin_chunked_prefill(PrefillRow(rows + i, prompt, 0))
                runner.prefill_chunk(rows + i, len(prompt))
        runner.decode([5] * len(runner.row_ids))  # warm-up
        return runner

    runners = {case: build(case) for case in ("none", "slot cache", "own cache", "pieces", "group")}
    times: dict[str, list[float]] = {case: [] for case in runners}
    for _ in range(rounds):
        for case, runner in runners.items():
            tokens = [5] * len(runner.row_ids)
            started = time.perf_counter()
            for _ in range(steps):
                runner.decode(tokens)
            times[case].append((time.perf_counter() - started) / steps)
    lines = ["| batch | decode step (ms, median) | KV cache (MB) |", "|---|---|---|"]
    labels = {"none": f"{rows} chat rows", "slot cache": f"+ one {len(long_prompt)}-token row in the slot cache",
              "own cache": f"+ one {len(long_prompt)}-token row in its own cache (the default)",
              "pieces": f"+ 32 rows of {len(many[0])}-{len(many[-1])} tokens in their own cache, each its own "
                        "attention call",
              "group": "+ the same 32 rows decoding as one group (one attention call per layer; the default here)"}
    for case, runner in runners.items():
        lines.append(f"| {labels[case]} | {1000 * statistics.median(times[case]):.0f} | {runner.cache_bytes / 1e6:.0f} |")
    return lines


def decode_ceiling(lengths: list[int], step_s: dict[int, float]) -> float:
    """Static batching's decode time over continuous batching's for one closed batch, from decode step costs by
    batch size (interpolated): both run as many steps as the longest request, but continuous batching's batch
    shrinks as requests end. The most continuous batching can gain on that workload on this machine."""
    sizes = sorted(step_s)

    def cost(rows: int) -> float:
        return float(np.interp(rows, sizes, [step_s[s] for s in sizes]))

    steps = max(lengths)
    shrinking = sum(cost(sum(1 for n in lengths if n > step)) for step in range(steps))
    return steps * cost(len(lengths)) / shrinking


def run_stalls(rounds: int) -> dict[str, list[dict]]:
    stalls: dict[str, list[dict]] = {mode: [] for mode in STALL_MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(rounds):
            for mode, flags in STALL_MODES.items():
                with reft_serve(Path(tmp) / f"stall-{mode}-{round_index}", *flags) as (_server, url):
                    asyncio.run(_load(url, [4] * 4))
                    stalls[mode].append(asyncio.run(_stall(url)))
    return stalls


def stall_table(stalls: dict[str, list[dict]]) -> list[str]:
    lines = ["| 16 rows decoding, a long prompt arrives | prompt tokens | ITL p50 (ms) | ITL p99 (ms) | p99 / p50 "
             "(goal <= 2) |", "|---|---|---|---|---|"]
    for mode, runs in stalls.items():
        p50, p99 = statistics.median(r["p50"] for r in runs), statistics.median(r["p99"] for r in runs)
        lines.append(f"| {mode} | {runs[0]['prompt_tokens']} | {1000 * p50:.0f} | {1000 * p99:.0f} | {p99 / p50:.2f} |")
    return lines


def print_stalls(stalls: dict[str, list[dict]]) -> None:
    print("\n".join(stall_table(stalls)))


COMPOSED_PERSONAS = 16
COMPOSED_MODES = {
    "1 intervention (`pN`)": lambda i: f"p{i % COMPOSED_PERSONAS}",
    "2 composed (`pN+pM`)": lambda i: f"p{i % COMPOSED_PERSONAS}+p{(i + 5) % COMPOSED_PERSONAS}",
    "2 composed, overlapping everywhere (`pN+pN`)": lambda i: f"p{i % COMPOSED_PERSONAS}+p{i % COMPOSED_PERSONAS}",
}


def run_composed(base: BaseModel, rounds: int, requests: int = 64, tokens: int = 64) -> list[str]:
    """Throughput of the fixed workload with one intervention per request vs two composed; a table."""
    results: dict[str, list[float]] = {mode: [] for mode in COMPOSED_MODES}
    with tempfile.TemporaryDirectory() as tmp, reft_serve(Path(tmp) / "composed") as (_server, url):
        for i in range(COMPOSED_PERSONAS):
            payload, _ = encode_artifact(random_persona(base.hidden_size, 100 + i), base.fingerprint)
            upload = httpx.post(f"{url}/v1/interventions", data={"name": f"p{i}"},
                                files={"file": ("p.safetensors", payload)})
            assert upload.status_code == 201, upload.text
        for model_of in COMPOSED_MODES.values():  # warm-up: every persona resident, every path run once
            asyncio.run(_load(url, [4] * COMPOSED_PERSONAS, [model_of(i) for i in range(COMPOSED_PERSONAS)]))
        for _ in range(rounds):
            for mode, model_of in COMPOSED_MODES.items():
                generated, wall = asyncio.run(_load(url, [tokens] * requests, [model_of(i) for i in range(requests)]))
                results[mode].append(generated / wall)
    single = statistics.median(results["1 intervention (`pN`)"])
    lines = [f"| {requests} concurrent x {tokens} tokens, every request with an intervention | tok/s (median) | "
             "vs 1 (goal >= 0.97) |", "|---|---|---|"]
    for mode, rates in results.items():
        lines.append(f"| {mode} | {statistics.median(rates):.1f} | {statistics.median(rates) / single:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace the engine section of BENCHMARKS.md")
    parser.add_argument("--only-stall", action="store_true", help="run only the long-prompt stall scenario")
    parser.add_argument("--only-long-row", action="store_true", help="run only the long-row decode step scenario")
    parser.add_argument("--only-composed", action="store_true", help="run only the composed-personas scenario")
    parser.add_argument("--skip-composed", action="store_true",
                        help="leave the composed-personas scenario out of a full run (it has its own section)")
    parser.add_argument("--composed-requests", type=int, default=64, help="(smaller for a smoke run)")
    parser.add_argument("--composed-tokens", type=int, default=64)
    args = parser.parse_args()
    workloads = WORKLOADS
    runs: dict[str, dict[str, list[dict]]] = {mode: {w: [] for w in workloads} for mode in MODES}
    hf_runs: dict[str, list[dict]] = {w: [] for w in workloads}
    in_process_runs: dict[str, list[dict]] = {w: [] for w in workloads}
    if args.only_stall:
        print_stalls(run_stalls(args.rounds))
        return
    base = load_base_model()
    if args.only_long_row:
        print("\n".join(long_row_steps(base)))
        return
    composed = [] if args.skip_composed else run_composed(base, args.rounds, args.composed_requests, args.composed_tokens)
    if args.only_composed:
        print("\n".join(composed))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for mode in MODES:
                for name, result in serve_round(mode, Path(tmp) / f"{mode}-{round_index}", workloads).items():
                    runs[mode][name].append(result)
            for name, workload in workloads.items():
                hf_runs[name].append(hf_static(base, workload.lengths, workload.clients))
                in_process_runs[name].append(engine_in_process(base, workload))
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    decode_alone = runner_decode_step(base)
    by_batch = {rows: runner_decode_step(base, rows) for rows in (1, 4, 16, 64)}
    ttfts: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp, reft_serve(Path(tmp) / "ttft") as (_server, url):
        payload, _ = encode_artifact(random_persona(base.hidden_size, 7), base.fingerprint)
        upload = httpx.post(f"{url}/v1/interventions", data={"name": "persona"}, files={"file": ("p.safetensors", payload)})
        assert upload.status_code == 201, upload.text
        long_prompt_ttft(url, (MODEL, "persona"), 2)  # warm-up
        ttfts = [long_prompt_ttft(url, (MODEL, "persona"), 5) for _ in range(args.rounds)]
    stalls = run_stalls(args.rounds)
    long_row = long_row_steps(base)

    def med(values: list[dict], key: str) -> float:
        return statistics.median(v[key] for v in values)

    lines = ["| scenario | tok/s (median) | wall s | decode steps | mean decode forward (ms) | wall per step (ms) |",
             "|---|---|---|---|---|---|"]
    for name in workloads:
        lines.append(f"| HF static `generate`, {name} | {med(hf_runs[name], 'tok_s'):.1f} | "
                     f"{med(hf_runs[name], 'wall'):.2f} | – | – | – |")
        lines.append(f"| engine in-process (no HTTP), {name} | {med(in_process_runs[name], 'tok_s'):.1f} | "
                     f"{med(in_process_runs[name], 'wall'):.2f} | – | – | – |")
        for mode in MODES:
            r = runs[mode][name]
            lines.append(f"| reft-serve ({mode}), {name} | {med(r, 'tok_s'):.1f} | {med(r, 'wall'):.2f} | "
                         f"{med(r, 'steps'):.0f} | {1000 * med(r, 'forward_s'):.0f} | {1000 * med(r, 'step_wall_s'):.0f} |")
    ratios = ["| comparison | value |", "|---|---|"]
    for name, goal in GOALS.items():
        for mode in MODES:
            ratio = med(runs[mode][name], "tok_s") / med(hf_runs[name], "tok_s")
            ratios.append(f"| {name}: reft-serve ({mode}) / HF static (goal >= {goal}) | {ratio:.2f} |")
        ratio = med(in_process_runs[name], "tok_s") / med(hf_runs[name], "tok_s")
        ratios.append(f"| {name}: engine in-process, no HTTP / HF static | {ratio:.2f} |")
    ratios.append(f"| in-process `ModelRunner.decode`, 64 rows, mean (ms) | {1000 * decode_alone:.0f} |")
    ratios.append(f"| mixed: the most continuous batching can gain over static batching with these step costs "
                  f"(decode steps only, the profile below) | {decode_ceiling(WORKLOADS['mixed'].lengths, by_batch):.2f} |")
    profile = ["| rows in the batch | " + " | ".join(str(r) for r in by_batch) + " |",
               "|---|" + "---|" * len(by_batch),
               "| in-process decode step (ms) | " + " | ".join(f"{1000 * t:.0f}" for t in by_batch.values()) + " |"]
    bare_ttft, persona_ttft = statistics.median(t[0] for t in ttfts), statistics.median(t[1] for t in ttfts)
    ratios.append(f"| TTFT of a ~512-token prompt, intervention / none (goal <= 1.02) | {persona_ttft / bare_ttft:.3f} "
                  f"({persona_ttft:.3f} s vs {bare_ttft:.3f} s) |")
    stall_lines = stall_table(stalls)
    env = (f"Python {platform.python_version()}, torch {torch.__version__}, "
           f"transformers {__import__('transformers').__version__}; {platform.machine()}, "
           f"{__import__('os').cpu_count()} CPU cores; SmolLM2-135M-Instruct fp32, greedy")
    section = "\n".join([
        "## Engine: continuous batching vs static batching", "",
        f"`bench/engine_bench.py --rounds {args.rounds}{' --skip-composed' if args.skip_composed else ''}` ({env}). Workloads: fixed = 64 concurrent streaming "
        "requests x 64 tokens; mixed = 16 concurrent requests of 16-128 tokens (seeded); mixed, 16 clients = 16 "
        "clients sending 4 requests each, one after another (64 requests of 16-128 tokens, seeded). HF static "
        "batching runs in-process on the same prompts in the same run, in batches of as many requests as there "
        "are clients, each decoded to its longest request; only requested tokens are counted for both. Rounds "
        "interleave the modes; medians.", "",
        *lines, "", *ratios, "",
        "Profile: one decode step in-process, by batch size (the forward alone; nothing else running):", "",
        *profile, "",
        "Inter-token latency of 16 streaming rows (96 tokens each) while a ~2,000-token prompt arrives 3 s in, with "
        "chunked prefill (default) and with every prompt prefilled in one forward (`prefill_chunk_share=0`):", "",
        *stall_lines, "",
        "A long row in the batch (in-process, the forward alone): every slot of the slot cache is as wide as its "
        "longest row, so a long prompt decoding there made every row attend over its columns; long rows now decode "
        "in a cache of their own:", "",
        *long_row, "",
        *(["Composed personas: one intervention per request vs two composed (`model: \"a+b\"`), the fixed workload, "
           "16 random personas:", "", *composed, ""] if composed else []),
    ])
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", "## Engine: continuous batching vs static batching", section)


if __name__ == "__main__":
    main()
