"""Cache row operations: filter/merge then decode == decode alone."""

from __future__ import annotations

import torch

from reft_core.bank import InterventionBank
from server.engine.runner import ModelRunner, PrefillRow
from tests import tiny


def greedy_continuation(runner: ModelRunner, steps: int, first: dict[int, int]) -> dict[int, list[int]]:
    out = {seq: [tok] for seq, tok in first.items()}
    for _ in range(steps):
        logits = runner.decode([out[s][-1] for s in runner.row_ids])
        for seq, token in zip(list(runner.row_ids), logits.argmax(-1).tolist()):
            out[seq].append(token)
    return out


def test_merge_and_filter_then_decode_equals_alone() -> None:
    model = tiny.tiny_llama()
    bank = InterventionBank(hidden_size=tiny.HIDDEN, num_layers=tiny.LAYERS, num_slots=1)
    prompts = {1: [5, 6, 7, 8, 9, 10, 11, 12], 2: [40, 41], 3: [100, 101, 102, 103]}

    alone = {}
    for seq, prompt in prompts.items():
        runner = ModelRunner(model, bank, pad_token_id=0)
        first = runner.prefill([PrefillRow(seq, prompt, 0)]).argmax(-1).tolist()[0]
        alone[seq] = greedy_continuation(runner, 6, {seq: first})[seq]

    runner = ModelRunner(model, bank, pad_token_id=0)
    first = dict(zip([1], runner.prefill([PrefillRow(1, prompts[1], 0)]).argmax(-1).tolist()))
    partial = greedy_continuation(runner, 2, first)  # row 1 is 3 tokens in
    first.update(zip([2, 3], runner.prefill([PrefillRow(2, prompts[2], 0), PrefillRow(3, prompts[3], 0)]).argmax(-1).tolist()))
    out = {1: partial[1], 2: [first[2]], 3: [first[3]]}
    for _ in range(2):
        logits = runner.decode([out[s][-1] for s in runner.row_ids])
        for seq, token in zip(list(runner.row_ids), logits.argmax(-1).tolist()):
            out[seq].append(token)
    width_before = runner.cache_columns
    runner.release([1])  # the longest row leaves: its leading columns are trimmed
    assert runner.cache_columns < width_before
    for _ in range(4):
        logits = runner.decode([out[s][-1] for s in runner.row_ids])
        for seq, token in zip(list(runner.row_ids), logits.argmax(-1).tolist()):
            out[seq].append(token)
    assert out[1] == alone[1][: len(out[1])]
    assert out[2] == alone[2][: len(out[2])] and len(out[2]) == 7
    assert out[3] == alone[3][: len(out[3])]
    runner.release([2, 3])
    assert runner.row_ids == [] and runner.cache_columns == 0
