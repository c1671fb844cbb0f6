"""The optional compiled decode path (`compile_decode`): decode forwards through torch.compile give the eager
forwards' logits while rows join and leave, with one compilation for every batch size and read width.

The test compiles with the `aot_eager` backend: the same graph capture and functionalization of the KV cache writes
as `inductor`, without generating kernels (which takes minutes on a 2-core CPU)."""

from __future__ import annotations

import torch

from reft_core.bank import InterventionBank
from server.engine.runner import ModelRunner, PrefillRow
from tests import tiny


def decode_logits(model, compile_decode: str | None) -> list[torch.Tensor]:
    """Logits of every decode step of a schedule where a row joins (a wider read) and one leaves."""
    runner = ModelRunner(model, InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1),
                         257, compile_decode)
    rows = {0: [5, 6, 7], 1: [9, 8]}
    last = dict(zip(rows, runner.prefill([PrefillRow(i, p, 0) for i, p in rows.items()]).argmax(-1).tolist()))
    seen = []
    for step in range(10):
        if step == 3:
            last[2] = int(runner.prefill([PrefillRow(2, list(range(20, 60)), 0)]).argmax())
        if step == 6:
            runner.release([0])
            del last[0]
        logits = runner.decode([last[i] for i in runner.row_ids])
        seen.append(logits)
        last = dict(zip(runner.row_ids, logits.argmax(-1).tolist()))
    return seen


def test_compiled_decode_equals_eager_decode_without_recompiling() -> None:
    model = tiny.tiny_llama()
    eager = decode_logits(model, None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # batch sizes and widths are symbols from the start
        compiled = decode_logits(model, "aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the decode forward was not compiled"
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
