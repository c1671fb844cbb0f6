"""Composed rows in the bank (`a+b`): equal to a plain loop that applies the interventions one after another
through `editing_layers` and the unfolded formulas; order matters exactly where two edit one layer and position;
a mixed batch (composed, single, none) equals each row alone; a chunked window edits what one forward would."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.config import InterventionConfig
from reft_core.generate import left_pad
from reft_core.hooks import editing_layers
from reft_core.intervention import Intervention

from tests.builders import composed_reference_logits

from .conftest import LAYERS, random_intervention

CONFIGS = [
    InterventionConfig(layers=(1,), rank=4, positions="l1"),
    InterventionConfig(layers=(1, 2), rank=2, positions="f1+l2", share_weights=False),
    InterventionConfig(layers=(0, 1), rank=8, positions="f2+l1", share_weights=True, type="direft"),
    InterventionConfig(layers=(3,), rank=3, positions="l3", type="noreft"),
    InterventionConfig(layers=(1,), rank=2, positions="f1"),  # same layer as CONFIGS[0], other position
]
PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [60, 61], [7, 7, 7, 100, 3, 1, 2, 3, 4, 5, 6, 99], [11, 12, 13]]


@pytest.fixture(scope="module")
def pool() -> list[Intervention]:
    return [random_intervention(c, seed=10 + i, scale=2.0) for i, c in enumerate(CONFIGS)]


def reference(model, prompt: list[int], parts: list[Intervention]) -> torch.Tensor:
    return composed_reference_logits(model, prompt, parts)


def banked(model, prompts: list[list[int]], rows: list[list[Intervention]]) -> list[torch.Tensor]:
    """Per-row logits of one left-padded forward, each row edited by its list of interventions through the bank."""
    distinct = list({id(i): i for parts in rows for i in parts}.values())
    bank = InterventionBank.for_interventions(distinct, num_layers=LAYERS)
    slot = {id(i): s for s, i in enumerate(distinct, start=1)}
    batch = left_pad(prompts, pad_token_id=0)
    placements = [RowPlacement.for_slots([slot[id(i)] for i in parts], n, o)
                  for parts, n, o in zip(rows, batch.lengths, batch.offsets)]
    plan = bank.plan(placements)
    with torch.no_grad(), editing_layers(model, bank.edits(plan)):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    return [logits[r, o:] for r, o in enumerate(batch.offsets)]


@settings(max_examples=20, deadline=None)
@given(order=st.lists(st.integers(0, len(CONFIGS) - 1), min_size=1, max_size=4), prompt=st.sampled_from(PROMPTS))
def test_composed_equals_parts_applied_one_after_another(model, pool, order, prompt) -> None:
    parts = [pool[i] for i in order]  # repeats allowed: `a+a` applies a twice
    (ours,) = banked(model, [prompt], [parts])
    torch.testing.assert_close(ours, reference(model, prompt, parts), rtol=1e-4, atol=1e-4)


def test_mixed_batch_of_composed_single_and_none_equals_each_alone(model, pool) -> None:
    rows = [[pool[0], pool[1], pool[2]], [pool[3]], [], [pool[2], pool[0]]]
    mixed = banked(model, PROMPTS, rows)
    for row, (prompt, parts) in enumerate(zip(PROMPTS, rows)):
        torch.testing.assert_close(mixed[row], reference(model, prompt, parts), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        bare = model(input_ids=torch.tensor([PROMPTS[2]])).logits[0]
    assert torch.equal(mixed[2], banked(model, [PROMPTS[2]], [[]])[0])
    torch.testing.assert_close(mixed[2], bare, rtol=1e-5, atol=1e-5)


def test_order_matters_only_where_two_edit_one_layer_and_position(model, pool) -> None:
    prompt = PROMPTS[0]
    a, b, disjoint = pool[0], pool[1], pool[4]  # a and b both edit the last token at layer 1; disjoint edits f1
    (ab,), (ba,) = banked(model, [prompt], [[a, b]]), banked(model, [prompt], [[b, a]])
    assert not torch.allclose(ab, ba, atol=1e-3)
    (ad,), (da,) = banked(model, [prompt], [[a, disjoint]]), banked(model, [prompt], [[disjoint, a]])
    torch.testing.assert_close(ad, da, rtol=1e-5, atol=1e-5)
    (alone,) = banked(model, [prompt], [[a]])
    assert not torch.allclose(ad, alone, atol=1e-3)  # the second part really edited something


def test_stages_only_where_positions_overlap(pool) -> None:
    """The single-intervention path is untouched (no later stage); a composition adds a stage only at layers where
    two parts edit one position."""
    bank = InterventionBank.for_interventions(pool, num_layers=LAYERS)
    single = bank.plan([RowPlacement(1, 7), RowPlacement(2, 7), RowPlacement(0, 7)])
    assert single.later == {}
    disjoint = bank.plan([RowPlacement.for_slots([1, 5], 7)])  # l1 and f1 at layer 1
    assert disjoint.later == {}
    overlapping = bank.plan([RowPlacement.for_slots([1, 2, 3], 7), RowPlacement(4, 7)])  # l1 at 1: 1, 2, 3
    assert sorted(overlapping.later) == [1] and len(overlapping.later[1]) == 2


@settings(max_examples=15, deadline=None)
@given(order=st.lists(st.integers(0, len(CONFIGS) - 1), min_size=2, max_size=4), start=st.integers(0, 12),
       width=st.integers(1, 12))
def test_a_window_plans_exactly_the_edits_inside_it(pool, order, start, width) -> None:
    """Chunked prefill plans one window at a time: the union of windows covers the whole plan, stage by stage."""
    bank = InterventionBank.for_interventions(pool, num_layers=LAYERS)
    row = RowPlacement.for_slots([i + 1 for i in order], len(PROMPTS[2]))

    def edits(plan, shift: int = 0) -> set[tuple[int, int, int, int]]:
        stages = {layer: [(plan.positions[layer], plan.entries[layer]), *plan.later.get(layer, ())]
                  for layer in plan.layers}
        return {(layer, stage, int(p) + shift, int(e)) for layer, s in stages.items()
                for stage, (ps, es) in enumerate(s) for p, e in zip(ps[0], es[0]) if int(e)}

    window = (start, start + width)
    inside = {edit for edit in edits(bank.plan([row])) if window[0] <= edit[2] < window[1]}
    assert edits(bank.plan([row], window=window), shift=start) == inside
