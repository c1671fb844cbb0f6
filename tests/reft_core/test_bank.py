"""Equivalences for the batched bank: identity for empty slots, mixed == alone, padding-invariance, == naive loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.config import InterventionConfig
from reft_core.functional import affine_delta, direft, fold, loreft
from reft_core.generate import left_pad
from reft_core.hooks import editing_layers
from reft_core.intervention import Intervention

from .conftest import HIDDEN, LAYERS, random_intervention

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [60, 61], [7, 7, 7, 100, 3, 1, 2, 3, 4, 5, 6, 99], [11, 12, 13]]
CONFIGS = [
    InterventionConfig(layers=(1,), rank=4, positions="l1"),
    InterventionConfig(layers=(0, 2), rank=2, positions="f1+l1", share_weights=False),
    InterventionConfig(layers=(1, 3), rank=8, positions="f2+l3", share_weights=True, type="direft"),
]


def forward(model, prompts, interventions, pad: str = "left") -> list[torch.Tensor]:
    """Per-row logits over the real prompt tokens, with each row's intervention applied through the bank."""
    distinct = [i for i in dict.fromkeys(interventions) if i is not None]
    bank = InterventionBank.for_interventions(distinct, num_layers=LAYERS)
    slot = {id(i): s for s, i in enumerate(distinct, start=1)}
    if pad == "left":
        batch = left_pad(prompts, pad_token_id=0)
        ids, mask, pos, offsets = batch.input_ids, batch.attention_mask, batch.position_ids, batch.offsets
    else:  # right padding: prompts start at 0
        width = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
        pos = torch.arange(width).expand(len(prompts), -1)
        offsets = [0] * len(prompts)
    rows = [
        RowPlacement(slot[id(i)] if i is not None else 0, len(p), o) for i, p, o in zip(interventions, prompts, offsets)
    ]
    plan = bank.plan(rows)
    with torch.no_grad(), editing_layers(model, bank.edits(plan)):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return [logits[r, o : o + len(p)] for r, (p, o) in enumerate(zip(prompts, offsets))]


def bare(model, prompts) -> list[torch.Tensor]:
    batch = left_pad(prompts, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    return [logits[r, o:] for r, o in enumerate(batch.offsets)]


@pytest.fixture(scope="module")
def interventions() -> list[Intervention]:
    return [random_intervention(c, seed=i) for i, c in enumerate(CONFIGS)]


def test_rows_without_intervention_equal_bare_model_exactly(model, interventions) -> None:
    mixed = forward(model, PROMPTS, [None, interventions[0], None, interventions[1]])
    reference = bare(model, PROMPTS)
    assert torch.equal(mixed[0], reference[0]) and torch.equal(mixed[2], reference[2])
    assert not torch.allclose(mixed[1], reference[1], atol=1e-3)  # the edited rows really changed
    assert not torch.allclose(mixed[3], reference[3], atol=1e-3)


def test_mixed_batch_equals_each_row_alone(model, interventions) -> None:
    chosen = [interventions[0], interventions[1], interventions[2], None]
    mixed = forward(model, PROMPTS, chosen)
    for row, (prompt, intervention) in enumerate(zip(PROMPTS, chosen)):
        (alone,) = forward(model, [prompt], [intervention])
        torch.testing.assert_close(mixed[row], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_left_padded_equals_right_padded_equals_unpadded(model, interventions, index) -> None:
    chosen = [interventions[index]] * len(PROMPTS)
    left, right = forward(model, PROMPTS, chosen, "left"), forward(model, PROMPTS, chosen, "right")
    for row, prompt in enumerate(PROMPTS):
        (unpadded,) = forward(model, [prompt], [interventions[index]])
        torch.testing.assert_close(left[row], unpadded, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(right[row], unpadded, rtol=1e-4, atol=1e-4)


def naive_forward(model, prompt: list[int], intervention: Intervention) -> torch.Tensor:
    """Straightforward reference: hook each layer, loop over units and positions, apply the unfolded formula."""
    config = intervention.config
    formula = direft if config.type == "direft" else loreft

    def make_hook(layer: int):
        def hook(_module, _args, h):
            h = h.clone()
            for unit, weights in intervention.units.items():
                if unit.layer != layer:
                    continue
                for p in config.positions_for(unit.group, len(prompt)):
                    h[0, p] = formula(h[0, p], *weights.as_tuple())
            return h

        return hook

    layers = model.model.layers
    handles = [layers[layer].register_forward_hook(make_hook(layer)) for layer in config.layers]
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([prompt])).logits[0]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_bank_equals_naive_per_position_loop(model, interventions, index) -> None:
    for prompt in PROMPTS:
        (ours,) = forward(model, [prompt], [interventions[index]])
        torch.testing.assert_close(ours, naive_forward(model, prompt, interventions[index]), rtol=1e-4, atol=1e-4)


def test_cleared_slot_is_identity_and_reload_replaces(model, interventions) -> None:
    bank = InterventionBank(hidden_size=HIDDEN, num_layers=LAYERS, num_slots=3)
    bank.load(1, interventions[1])
    bank.load(2, interventions[2])  # larger rank: the bank pads everything to 8
    bank.clear(1)
    batch = left_pad(PROMPTS[:1], 0)
    with pytest.raises(KeyError):
        bank.plan([RowPlacement(1, len(PROMPTS[0]), 0)])
    plan = bank.plan([RowPlacement(0, len(PROMPTS[0]), 0)])
    assert plan.layers == []
    bank.load(1, interventions[0])
    plan = bank.plan([RowPlacement(1, len(PROMPTS[0]), 0)])
    with torch.no_grad(), editing_layers(model, bank.edits(plan)):
        ours = model(input_ids=batch.input_ids).logits[0]
    torch.testing.assert_close(ours, naive_forward(model, PROMPTS[0], interventions[0]), rtol=1e-4, atol=1e-4)


def test_one_token_prompt_gets_no_positions(model, interventions) -> None:
    """pyreft clamps to L // 2: a one-token prompt has nothing to edit, so it equals the bare model."""
    (ours,) = forward(model, [[42]], [interventions[0]])
    assert torch.equal(ours, bare(model, [[42]])[0])


@settings(max_examples=50, deadline=None)
@given(kind=st.sampled_from(["loreft", "noreft", "direft"]), rank=st.integers(1, 6), pad=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_folded_form_with_rank_padding_equals_formula(kind: str, rank: int, pad: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d = 16
    h, R, W, b = torch.randn(3, 5, d, generator=g), torch.randn(rank, d, generator=g), torch.randn(rank, d, generator=g), torch.randn(rank, generator=g)
    A, C, bias = fold(kind, R, W, b)
    A, C = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (A, C))  # zero-pad the rank
    bias = torch.nn.functional.pad(bias, (0, pad))
    delta = affine_delta(h, A.expand(3, 5, -1, -1), C.expand(3, 5, -1, -1), bias.expand(3, 5, -1))
    expected = (direft if kind == "direft" else loreft)(h, R, W, b)
    torch.testing.assert_close(h + delta, expected, rtol=1e-4, atol=1e-4)


def test_zero_weights_are_exactly_identity() -> None:
    h = torch.randn(2, 3, 8)
    zeros = torch.zeros(2, 3, 4, 8)
    assert torch.equal(h + affine_delta(h, zeros, zeros, torch.zeros(2, 3, 4)), h)


def test_bank_memory_follows_what_is_resident() -> None:
    """Tables exist only for layers a resident intervention edits, at the largest resident rank there, with slot
    capacity near the highest slot used; evicting the big one shrinks them back (and outputs stay exact: the
    equivalence tests above run on the same bank)."""
    from reft_core.bank import InterventionBank

    bank = InterventionBank(hidden_size=HIDDEN, num_layers=4, num_slots=257)
    assert bank.nbytes == 0
    small = random_intervention(InterventionConfig(layers=(1,), rank=2, positions="l1"), seed=1)
    big = random_intervention(InterventionConfig(layers=(1, 3), rank=16, positions="l1"), seed=2)
    bank.load(1, small)
    one_small = bank.nbytes
    assert bank.layer_rank(1) == 2 and bank.layer_rank(3) == 0 and bank.layer_rank(0) == 0
    assert one_small <= 2 * 2 * (2 * 2) * 2 * HIDDEN * 4  # a few entries at rank 2, not 257 slots at some max rank
    bank.load(2, big)
    assert bank.layer_rank(1) == 16 and bank.layer_rank(3) == 16
    bank.clear(2)
    assert bank.layer_rank(1) == 2 and bank.layer_rank(3) == 0
    assert bank.nbytes <= 2 * one_small  # capacity may have doubled once; the rank and layer 3 are gone
    bank.clear(1)
    assert bank.nbytes == 0


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 16), st.integers(0, len(CONFIGS) - 1)), max_size=25))
def test_projected_bytes_equal_the_bytes_after_the_load(interventions, ops) -> None:
    """Residency's byte bound trusts `nbytes_with`: it must equal what the load really allocates, after any history
    of loads and clears (capacity growing and halving, ranks growing and shrinking)."""
    bank = InterventionBank(hidden_size=HIDDEN, num_layers=LAYERS, num_slots=17)
    resident: set[int] = set()
    for load, slot, index in ops:
        if load and slot not in resident:
            projected = bank.nbytes_with(slot, interventions[index])
            bank.load(slot, interventions[index])
            assert bank.nbytes == projected
            resident.add(slot)
        elif not load:
            bank.clear(slot)
            resident.discard(slot)
    for slot in sorted(resident, reverse=True)[:-1]:  # keep only the lowest slot: capacity is cut back towards it
        bank.clear(slot)
    if resident:
        needed = (min(resident) + 1) * 2
        assert all(bank._shape(layer)[0] < 4 * needed + 4 for layer in range(LAYERS))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_packed_plan_edits_each_segment_where_its_own_plan_does(interventions, data) -> None:
    """Segments packed side by side in one row get exactly the edits each gets planned alone, shifted to its
    columns (composed segments' later stages included)."""
    bank = InterventionBank.for_interventions(interventions, num_layers=LAYERS)
    segments, column = [], 0
    for _ in range(data.draw(st.integers(1, 4))):
        slots = data.draw(st.lists(st.integers(1, len(interventions)), max_size=3))  # empty: no intervention
        length = data.draw(st.integers(1, 12))
        start = data.draw(st.integers(0, length - 1))
        end = data.draw(st.integers(start + 1, length))
        placement = RowPlacement.for_slots(slots, length)
        segments.append((placement, (start, end), column))
        column += end - start + data.draw(st.integers(0, 3))  # segments need not touch

    def edits(plan, shift: int = 0) -> set[tuple[int, int, int, int]]:
        """(layer, stage, column, entry) of every real edit (padding entries add nothing)."""
        found = set()
        for layer in plan.layers:
            stages = [(plan.positions[layer], plan.entries[layer]), *plan.later.get(layer, ())]
            for stage, (positions, entries) in enumerate(stages):
                found |= {(layer, stage, int(p) + shift, int(e)) for p, e in zip(positions[0], entries[0]) if e}
        return found

    packed = edits(bank.plan_packed(segments))
    alone = set().union(*(edits(bank.plan([p], window=w), c) for p, w, c in segments))
    assert packed == alone
