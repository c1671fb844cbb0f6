"""Engine checks on an accelerator (CUDA, bf16 by default), runnable offline in a few minutes; writes a JSON and a
markdown report. `bench/device_check.sh` is the entry point; `--device cpu --quick` smoke-tests it anywhere.

Correctness (token agreement of greedy outputs; bf16 reductions may legitimately differ late in a sequence, so the
report gives rates, and the script fails only below `--min-agreement`):
  none == bare            engine rows without an intervention vs HF `generate`
  mixed == alone          each row of a batch of mixed personas vs the same request alone
  engine == reference     the engine vs `reft_core.generate` (our reference, tested equal to pyreft on CPU)
  chunked == one forward  a long prompt prefilled in chunks while rows decode vs in one forward
  speculative == plain    the mixed-lengths run with speculative decoding (a step cap sized for a GPU) vs without
Speed (in-process engine, no HTTP): 64 distinct personas vs none; fixed length (64 x 64) and mixed lengths (16
requests, 16-128 tokens, with and without speculative decoding) vs HF static batching; TTFT of a 512-token prompt
with and without an intervention.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import PROMPTS, random_persona  # noqa: E402
from reft_core.base_model import BaseModel, load_base_model  # noqa: E402
from reft_core.examples import encode_prompt  # noqa: E402
from reft_core.generate import generate  # noqa: E402
from server.engine.engine import Engine, EngineSettings, eos_token_ids  # noqa: E402
from server.engine.types import GenerationRequest, InterventionRef, SamplingParams  # noqa: E402


def run_engine(base: BaseModel, jobs: list[tuple[list[int], object, int]], late: int = 0,
               **settings) -> tuple[list[list[int]], float]:
    """Greedy outputs of (prompt ids, persona or None, max_tokens) jobs through one engine; and the wall time.
    The last `late` jobs arrive once the first job has 8 tokens (so they join a decoding batch)."""
    engine = Engine(base.model, base.tokenizer, EngineSettings(**({"max_running": 64} | settings)))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(jobs))}
    requests = []
    for i, (prompt, persona, tokens) in enumerate(jobs):
        ref = InterventionRef(f"p{id(persona)}", f"k{id(persona)}", persona) if persona is not None else None
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, min_tokens=tokens)
        requests.append((GenerationRequest(str(i), tuple(prompt), params, ref),
                         lambda event, key=str(i): outputs[key].extend(event.token_ids)))
    first_sink = requests[0][1]

    def first_then_late(event: object) -> None:
        first_sink(event)
        if len(outputs["0"]) >= 8 and late_requests:
            for request in late_requests:
                engine.submit(*request)
            late_requests.clear()

    late_requests = requests[len(requests) - late :] if late else []
    requests = [(requests[0][0], first_then_late), *requests[1 : len(requests) - late]]
    _sync(base)
    started = time.perf_counter()
    engine.run_until_idle(requests)
    _sync(base)
    return [outputs[str(i)] for i in range(len(jobs))], time.perf_counter() - started


def _sync(base: BaseModel) -> None:
    if base.device.type == "cuda":
        torch.cuda.synchronize()


def before_eos(tokens: list[int], eos: tuple[int, ...]) -> int:
    """How many tokens come before the first EOS (all of them if none)."""
    return next((i for i, token in enumerate(tokens) if token in eos), len(tokens))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of sequences that are identical."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def hf_static(base: BaseModel, prompts: list[list[int]], lengths: list[int]) -> tuple[list[list[int]], float]:
    width = max(len(p) for p in prompts)
    pad = base.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=base.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=base.device)
    longest = max(lengths)
    _sync(base)
    started = time.perf_counter()
    with torch.inference_mode():
        out = base.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                  do_sample=False, pad_token_id=pad)
    _sync(base)
    wall = time.perf_counter() - started
    return [row[width : width + n].tolist() for row, n in zip(out, lengths)], wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, default=Path("device-check"))
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--min-agreement", type=float, default=0.75)
    parser.add_argument("--compile-backend", default=None,
                        help="also check decode forwards compiled with this torch.compile backend (inductor, cudagraphs)")
    parser.add_argument("--speculative-tokens", type=int, default=4)
    parser.add_argument("--speculative-step-tokens", type=int, default=256)
    args = parser.parse_args()
    base = load_base_model(device=args.device, dtype=args.dtype)
    rows, tokens = (8, 8) if args.quick else (64, 64)
    prompts = [encode_prompt(base.tokenizer, PROMPTS[i % len(PROMPTS)], chat_template=True) for i in range(rows)]
    personas = [random_persona(base.hidden_size, seed) for seed in range(rows)]
    report: dict[str, object] = {"device": str(base.device), "dtype": str(base.dtype), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name() if base.device.type == "cuda" else None}
    run_engine(base, [(prompts[0], personas[0], 4)])  # warm-up (kernels, allocator)

    bare, bare_wall = run_engine(base, [(p, None, tokens) for p in prompts])
    hf_out, hf_wall = hf_static(base, prompts, [tokens] * rows)
    mixed, mixed_wall = run_engine(base, [(p, personas[i], tokens) for i, p in enumerate(prompts)])
    alone = [run_engine(base, [(p, personas[i], tokens)])[0][0] for i, p in enumerate(prompts[:8])]
    reference = [generate(base.model, [p], [personas[i]], max_new_tokens=tokens)[0] for i, p in enumerate(prompts[:8])]
    eos = eos_token_ids(base.model, base.tokenizer)
    long_prompt = encode_prompt(base.tokenizer, " ".join(["The quick brown fox jumps over the lazy dog."] * 40), chat_template=False)
    long_jobs = [(prompts[1], None, 48), (prompts[2], personas[2], 24), (long_prompt, personas[0], 16)]
    # the short prompt and the long one join while the first row decodes: packed into its decode forwards
    chunked, _ = run_engine(base, long_jobs, late=2, prefill_chunk_tokens=64)
    one_forward, _ = run_engine(base, long_jobs, late=2, prefill_chunk_share=0.0)
    correctness = {
        "none == bare (vs HF generate)": agreement(bare, hf_out),
        "mixed == alone": agreement(mixed[:8], alone),
        # the engine's rows mask EOS (min_tokens, as HF's min_new_tokens does); the reference, told of no EOS,
        # may choose it: compare up to the reference's first EOS
        "engine == reference generate": agreement(*zip(*(
            (m[:cut], r[:cut]) for m, r in zip(mixed[:8], reference) for cut in [before_eos(r, eos)]))),
        "chunked == one forward": agreement(chunked, one_forward),
    }
    compiled_speed = {}
    if args.compile_backend:
        run_engine(base, [(p, None, 8) for p in prompts], compile_decode=args.compile_backend)  # compiles
        compiled, compiled_wall = run_engine(base, [(p, None, tokens) for p in prompts],
                                             compile_decode=args.compile_backend)
        correctness[f"compiled decode ({args.compile_backend}) == eager"] = agreement(compiled, bare)
        compiled_speed[f"compiled decode ({args.compile_backend}) / eager (tok/s ratio)"] = bare_wall / compiled_wall
    lengths = [random.Random(i).randint(16, 128) for i in range(16)]
    mixed_jobs = [(prompts[i % rows], None, n) for i, n in enumerate(lengths)]
    mixed_len, mixed_len_wall = run_engine(base, mixed_jobs)
    _, hf_mixed_wall = hf_static(base, [prompts[i % rows] for i in range(16)], lengths)
    # speculative decoding with a cap sized for a GPU, where a forward's cost is flat far past 16 tokens
    speculative, speculative_wall = run_engine(base, mixed_jobs, speculative_tokens=args.speculative_tokens,
                                               speculative_step_tokens=args.speculative_step_tokens)
    correctness["speculative decoding == plain (mixed lengths)"] = agreement(speculative, mixed_len)
    ttft = {"none": [], "intervention": []}
    ttft_prompt = encode_prompt(base.tokenizer, " ".join(["The quick brown fox jumps over the lazy dog."] * 50), chat_template=False)
    for _ in range(3 if args.quick else 10):
        for key, persona in (("none", None), ("intervention", personas[1])):
            ttft[key].append(run_engine(base, [(ttft_prompt, persona, 1)])[1])
    speed = {
        "64 distinct personas / none (tok/s ratio)": bare_wall / mixed_wall,
        "fixed length: engine / HF static": hf_wall / bare_wall,
        "mixed lengths: engine / HF static (useful tokens)": hf_mixed_wall / mixed_len_wall,
        "mixed lengths: speculative engine / HF static (useful tokens)": hf_mixed_wall / speculative_wall,
        "TTFT 512-token prompt, intervention / none": statistics.median(ttft["intervention"]) / statistics.median(ttft["none"]),
        "engine tok/s, fixed length, no intervention": rows * tokens / bare_wall,
        "HF static tok/s, fixed length": rows * tokens / hf_wall,
    } | compiled_speed
    report |= {"correctness": correctness, "speed": speed, "rows": rows, "tokens": tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"Device check: {report['gpu'] or report['device']}, {report['dtype']}, torch {report['torch']}", "",
             "| check | value |", "|---|---|"]
    lines += [f"| {name} (identical sequences) | {value:.2f} |" for name, value in correctness.items()]
    lines += [f"| {name} | {value:.3f} |" for name, value in speed.items()]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if min(correctness.values()) >= args.min_agreement else 1


if __name__ == "__main__":
    raise SystemExit(main())
