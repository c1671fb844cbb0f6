"""The reference `generate`: no intervention == HF greedy generate; mixed batch == each row alone."""

from __future__ import annotations

import torch

from reft_core.config import InterventionConfig
from reft_core.generate import generate

from .conftest import random_intervention

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [60, 61], [7, 7, 7, 100, 3, 1, 2, 3, 4, 5, 6, 99]]


def test_without_interventions_matches_hf_greedy_generate(model) -> None:
    ours = generate(model, PROMPTS, [None] * len(PROMPTS), max_new_tokens=12)
    for prompt, tokens in zip(PROMPTS, ours):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == hf[0, len(prompt) :].tolist()


def test_mixed_interventions_equal_each_row_alone(model) -> None:
    a = random_intervention(InterventionConfig(layers=(1,), rank=4, positions="l1"), seed=1, scale=2.0)
    b = random_intervention(InterventionConfig(layers=(0, 3), rank=2, positions="f1+l1"), seed=2, scale=2.0)
    chosen = [a, None, b]
    mixed = generate(model, PROMPTS, chosen, max_new_tokens=12)
    alone = [generate(model, [p], [i], max_new_tokens=12)[0] for p, i in zip(PROMPTS, chosen)]
    assert mixed == alone
    bare = generate(model, PROMPTS, [None] * 3, max_new_tokens=12)
    assert mixed[0] != bare[0] and mixed[2] != bare[2]  # the interventions really steer
    assert mixed[1] == bare[1]


def test_stops_at_eos_per_row(model) -> None:
    free = generate(model, PROMPTS, [None] * 3, max_new_tokens=8)
    eos = free[0][3]
    stopped = generate(model, PROMPTS, [None] * 3, max_new_tokens=8, eos_token_id=eos)
    for row in range(3):
        expected = free[row][: free[row].index(eos)] if eos in free[row] else free[row]
        assert stopped[row] == expected
