"""A real server (embedded SmolLM2) serving a long prompt among short ones stays within a stated memory bound.

The slot KV cache gives every slot the longest row's column capacity, so one long prompt makes every row pay for
its columns: without a bound, 16 short rows plus a ~1,500-token prompt would hold 32 x 2,048 columns x 46 KB, some
3 GB (most of it allocated, if untouched), for 94 MB of real keys and values. With a 256 MiB budget the long prompt
waits until it fits.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .process import server_process, tree_rss_bytes

pytestmark = pytest.mark.e2e

BUDGET = 256 << 20
BOUND = BUDGET + (512 << 20)  # over the warm RSS: the budget, one long prefill's activations, allocator slack
MODEL = "SmolLM2-135M-Instruct"


def test_a_long_prompt_among_short_ones_keeps_rss_bounded(tmp_path) -> None:
    budget = f"kv_cache_budget_bytes={BUDGET}"
    with server_process(None, tmp_path / "data", "--set", budget) as (process, url), httpx.Client(timeout=300) as client:
        warm = client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hello " * 300, "max_tokens": 4})
        assert warm.status_code == 200, warm.text
        base, peak = tree_rss_bytes(process.pid), 0
        statuses: list[int] = []

        def call(prompt: str, max_tokens: int) -> None:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
            statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=300).status_code)

        short = [threading.Thread(target=call, args=(f"Tell me a story about {i}.", 48)) for i in range(16)]
        long = threading.Thread(target=call, args=("The quick brown fox jumps over the lazy dog. " * 150, 4))
        for thread in short:
            thread.start()
        time.sleep(1.0)
        long.start()
        while any(t.is_alive() for t in [*short, long]):
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.05)
        assert statuses == [200] * 17
        assert peak - base < BOUND, f"RSS grew by {(peak - base) >> 20} MiB (bound {BOUND >> 20} MiB)"
        print(f"peak RSS growth {(peak - base) >> 20} MiB over {base >> 20} MiB")
