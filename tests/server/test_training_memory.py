"""A real server process (embedded SmolLM2) training on many long examples stays within a stated memory bound.

Before the context budget, a job kept every example's frozen context (prefix keys/values at every layer, about
40 MB per 900-token example on SmolLM2, fp32) for its whole run: the 64 examples here would hold about 2.6 GB before
the first step ended. With a 64 MiB budget the process grows by what the budget keeps plus one micro-batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from .process import server_process, tree_rss_bytes

pytestmark = pytest.mark.e2e

BUDGET = 64 << 20
BOUND = 600 << 20  # over the RSS after a warm-up request: budget + one micro-batch + allocator slack
EXAMPLES = [{"prompt": "hello " * 880, "completion": f"Sure thing {i}!"} for i in range(64)]  # ~890 tokens each


def rss_bytes(pid: int) -> int:
    return tree_rss_bytes(pid)  # the server and its engine process, where training runs


def test_training_many_long_examples_keeps_rss_bounded(tmp_path) -> None:
    budget = f"training_context_budget_bytes={BUDGET}"
    with server_process(None, tmp_path / "data", "--set", budget) as (process, url), httpx.Client(timeout=60) as client:
        warm = client.post(f"{url}/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "hello " * 200,
                                                          "max_tokens": 2})
        assert warm.status_code == 200, warm.text  # every weight and the serving path touched: the base RSS
        base = rss_bytes(process.pid)
        body = {"name": "long", "examples": EXAMPLES, "chat_template": False,
                "intervention": {"rank": 2, "positions": "l1"}, "hyperparameters": {"epochs": 1, "batch_size": 2}}
        created = client.post(f"{url}/v1/trainings", json=body)
        assert created.status_code == 202, created.text
        job_id, peak, step = created.json()["id"], base, 0
        deadline = time.time() + 240
        while step < 3:  # a few optimizer steps: kept contexts fill the budget, the rest are recomputed
            assert time.time() < deadline, f"only {step} steps in time"
            peak = max(peak, rss_bytes(process.pid))
            assert peak - base < BOUND, f"RSS grew by {(peak - base) >> 20} MiB (bound {BOUND >> 20} MiB) at step {step}"
            job = client.get(f"{url}/v1/trainings/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
            step = job.get("progress", {}).get("step", 0)
            time.sleep(0.1)
        assert client.delete(f"{url}/v1/trainings/{job_id}").status_code == 200
        print(f"peak RSS growth {(peak - base) >> 20} MiB over {base >> 20} MiB after {step} steps")
