"""Speculative decoding: the n-gram proposer equals a brute-force search, acceptance keeps exactly the stood
prefix, a forward over drafts equals one step at a time, and the engine's output with drafts (right, wrong, or
found by lookup) equals its output without them, with sampled rows, stops and limits in the same batch."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft_core.bank import InterventionBank
from server.engine.engine import Engine, EngineSettings
from server.engine.runner import ModelRunner, PrefillRow
from server.engine.sampler import RowSampling, greedy_continuations, sample
from server.engine.speculative import NgramProposer, accept_drafts
from server.engine.types import GenerationRequest, SamplingParams
from server.metrics import Metrics

tokens_strategy = st.lists(st.integers(0, 3), min_size=1, max_size=40)  # a small alphabet: many repeats


def brute_force_proposal(tokens: list[int], max_tokens: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):  # latest earlier occurrence first
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + max_tokens]
    return []


@settings(max_examples=200, deadline=None)
@given(prompt=tokens_strategy, output=st.lists(st.integers(0, 3), max_size=30), max_tokens=st.integers(1, 5),
       ngram=st.sampled_from([(1, 1), (1, 3), (2, 4)]), steps=st.integers(1, 4))
def test_proposer_equals_brute_force_however_output_arrives(prompt, output, max_tokens, ngram, steps) -> None:
    proposer = NgramProposer(prompt, *ngram)
    for cut in sorted({len(output) * i // steps for i in range(1, steps + 1)}):  # output taken in in a few pieces
        proposer.sync(output[:cut])
        assert proposer.propose(max_tokens) == brute_force_proposal(prompt + output[:cut], max_tokens, *ngram)


def test_proposer_acceptance_follows_its_guesses() -> None:
    loop = NgramProposer([1, 2, 3])
    loop.sync([1, 2, 3] * 10)  # after the first token, every guess is right
    assert loop.acceptance > 0.99
    fresh = NgramProposer([1, 2, 3])
    fresh.sync(list(range(10, 40)))  # nothing ever repeats: no guess, all misses
    assert fresh.acceptance == 0.0


@given(draft=st.lists(st.integers(0, 2), max_size=5), data=st.data())
def test_acceptance_keeps_the_longest_prefix_that_stood(draft, data) -> None:
    targets = data.draw(st.lists(st.one_of(st.integers(0, 2), st.none()), min_size=len(draft) + 1,
                                 max_size=len(draft) + 1))
    emitted = accept_drafts(draft, targets)
    assert 1 <= len(emitted) <= len(draft) + 1
    assert emitted == targets[: len(emitted)]
    assert all(token is not None for token in emitted[1:])
    stood = len(emitted) - 1
    assert draft[:stood] == emitted[:stood]  # each draft token kept equals the model's choice before it
    if stood < len(draft):  # and the first one not kept differs, or the model's next choice was unusable
        assert draft[stood] != emitted[stood] or emitted[stood] is None or targets[stood + 1] is None


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, (1e-4, 1e-5)), (torch.bfloat16, (0.02, 0.06))],
                         ids=["float32", "bfloat16"])
def test_a_forward_over_drafts_equals_one_step_at_a_time(model, dtype, tolerance) -> None:
    """Logits at every draft position, and the cache after `accept`, equal plain decode steps over the same tokens
    (in bf16, the dtype served on GPUs, within its rounding)."""
    rtol, atol = tolerance
    model = copy.deepcopy(model).to(dtype)
    prompts, drafts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]], [[12, 13, 14], [], [15]]
    bank = InterventionBank(hidden_size=model.config.hidden_size, num_layers=model.config.num_hidden_layers,
                            num_slots=1)
    stepped, drafted = ModelRunner(model, bank, 0), ModelRunner(model, bank, 0)
    for runner in (stepped, drafted):
        runner.prefill([PrefillRow(i, p, 0) for i, p in enumerate(prompts)])
    last = [20, 21, 22]
    wide = drafted.decode_drafts(last, drafts)
    # step by step: every row's inputs one at a time
    inputs, ids = [[token, *draft] for token, draft in zip(last, drafts)], [0, 1, 2]
    for t in range(wide.shape[1]):
        if t:  # the rows with inputs left step on together
            keep = [k for k, row in enumerate(inputs) if len(row) > t]
            stepped.release([ids[k] for k in range(len(ids)) if k not in keep])
            ids, inputs, wide = [ids[k] for k in keep], [inputs[k] for k in keep], wide[keep]
            assert stepped.row_ids == ids
        narrow = stepped.decode([row[t] for row in inputs])
        torch.testing.assert_close(wide[:, t], narrow, atol=atol, rtol=rtol)
    # accept: row 0 keeps 2 of its 4 inputs, rows 1 and 2 keep their last token only; then both runners agree
    drafted.accept([2, 1, 1])
    fresh = ModelRunner(model, bank, 0)
    fresh.prefill([PrefillRow(0, prompts[0] + [20, 12], 0), PrefillRow(1, prompts[1] + [21], 0),
                   PrefillRow(2, prompts[2] + [22], 0)])
    torch.testing.assert_close(drafted.decode([30, 31, 32]), fresh.decode([30, 31, 32]), atol=atol, rtol=rtol)


REQUESTS = [  # (prompt, params): greedy rows with repeats to find, a sampled row, stops, limits
    ([5, 6, 7, 5, 6, 7, 5, 6], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
    ([9, 9, 9, 9], SamplingParams(max_tokens=33, temperature=0, ignore_eos=True)),
    ([40, 41, 42], SamplingParams(max_tokens=25, temperature=0.9, seed=7, ignore_eos=True)),
    ([11, 12, 13, 11, 12], SamplingParams(max_tokens=30, temperature=0, min_tokens=20)),
    ([20, 21, 20, 21], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)),
    ([30, 31, 30, 31, 30], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=(31,))),
]


def run(model, tokenizer, settings: EngineSettings = EngineSettings()) -> tuple[dict[str, list[int]], dict, Metrics]:
    """Tokens and finish reason of every request in REQUESTS, served together."""
    metrics = Metrics()
    engine = Engine(model, tokenizer, settings, metrics)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}

    def sink_for(request_id: str):  # noqa: ANN202
        tokens[request_id] = []

        def sink(event) -> None:  # noqa: ANN001
            tokens[request_id].extend(event.token_ids)
            if event.finish_reason is not None:
                reasons[request_id] = event.finish_reason.value
        return sink

    engine.run_until_idle((GenerationRequest(f"r{i}", tuple(prompt), params), sink_for(f"r{i}"))
                          for i, (prompt, params) in enumerate(REQUESTS))
    return tokens, reasons, metrics


SPECULATIVE = EngineSettings(speculative_tokens=4, speculative_step_tokens=64, speculative_min_acceptance=0.0)


def test_lookup_drafts_leave_every_output_unchanged(model, tokenizer) -> None:
    plain_tokens, plain_reasons, _ = run(model, tokenizer)
    tokens, reasons, metrics = run(model, tokenizer, SPECULATIVE)
    assert (tokens, reasons) == (plain_tokens, plain_reasons)
    assert metrics.accepted_draft_tokens._value.get() > 0  # drafts stood: the path was exercised
    assert metrics.draft_tokens._value.get() > metrics.accepted_draft_tokens._value.get()  # and some failed


class OracleProposer:
    """Drafts the reference output's next tokens, corrupting one of them at random now and then: drafts stand up
    to every position, or fail at any."""

    reference: dict[tuple[int, ...], list[int]] = {}
    rng = random.Random(0)

    def __init__(self, prompt_ids, *_args) -> None:  # noqa: ANN001
        self.expected = self.reference[tuple(prompt_ids)]
        self.generated = 0
        self.acceptance = 1.0

    def sync(self, generated) -> None:  # noqa: ANN001
        assert list(generated) == self.expected[: len(generated)]
        self.generated = len(generated)

    def propose(self, max_tokens: int) -> list[int]:
        draft = list(self.expected[self.generated : self.generated + max_tokens])
        if draft and self.rng.random() < 0.5:
            draft[self.rng.randrange(len(draft))] += 1
        return draft


@pytest.mark.parametrize("seed", range(3))
def test_right_and_wrong_drafts_leave_every_output_unchanged(model, tokenizer, monkeypatch, seed) -> None:
    plain_tokens, plain_reasons, plain_metrics = run(model, tokenizer)
    OracleProposer.reference = {tuple(prompt): plain_tokens[f"r{i}"] for i, (prompt, _) in enumerate(REQUESTS)}
    OracleProposer.rng = random.Random(seed)
    monkeypatch.setattr("server.engine.engine.NgramProposer", OracleProposer)
    tokens, reasons, metrics = run(model, tokenizer, SPECULATIVE)
    assert (tokens, reasons) == (plain_tokens, plain_reasons)
    steps = sum(b.get() for b in metrics.decode_step._buckets)
    plain_steps = sum(b.get() for b in plain_metrics.decode_step._buckets)
    assert steps < plain_steps  # the drafts that stood saved steps


def test_drafting_stays_within_the_step_cap(model, tokenizer, monkeypatch) -> None:
    """Six rows and a cap of 12 tokens: each step is at most 2 wide, so at most one draft token per row."""
    widths: list[int] = []
    original = ModelRunner.decode_drafts

    def recording(self, last_tokens, drafts):  # noqa: ANN001, ANN202
        widths.append(len(last_tokens) * (1 + max(len(d) for d in drafts)))
        return original(self, last_tokens, drafts)

    monkeypatch.setattr(ModelRunner, "decode_drafts", recording)
    plain_tokens, _, _ = run(model, tokenizer)
    capped = EngineSettings(speculative_tokens=4, speculative_step_tokens=12, speculative_min_acceptance=0.0)
    tokens, _, _ = run(model, tokenizer, capped)
    assert tokens == plain_tokens
    assert widths and max(widths) <= 12


@settings(max_examples=50, deadline=None)
@given(generated=st.lists(st.integers(0, 6), min_size=1, max_size=4), min_tokens=st.integers(0, 8),
       seed=st.integers(0, 1000))
def test_continuations_equal_greedy_sampling_one_step_at_a_time(generated, min_tokens, seed) -> None:
    """Position t of a row that has generated g tokens is sampled as a greedy row at g + t would be: EOS masked
    while below `min_tokens` (here EOS is every position's best token), non-finite logits unusable."""
    eos, positions, vocab = (3,), 4, 10
    logits = torch.randn(len(generated), positions, vocab, generator=torch.Generator().manual_seed(seed))
    logits[..., eos[0]] += 10
    logits[0, 1, 5] = float("nan")
    rows = [RowSampling(SamplingParams(temperature=0, min_tokens=min_tokens), g, None) for g in generated]
    continuations = greedy_continuations(logits, rows, eos)
    for t in range(positions):
        one_step = [RowSampling(row.params, row.generated + t + 1, None) for row in rows]
        assert [c[t] for c in continuations] == sample(logits[:, t], one_step, eos)
