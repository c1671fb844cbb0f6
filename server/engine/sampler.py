"""Turns a batch of next-token logits into one token per row, honouring each row's own sampling parameters.

Everything is batched: one argmax for greedy rows, and for sampled rows one temperature scale, one sort for top-k
and top-p, and one draw by the exponential race (`argmax(p / q)`, `q ~ Exp(1)`, which picks token i with
probability p_i). The race lets every seeded row draw its noise from its own generator (so a seeded request's
output does not depend on its batch-mates) while unseeded rows share one draw, with a single host sync per step.

Sampling cannot raise on any parameters the API accepts: temperatures below `MIN_TEMPERATURE` are greedy (their
reciprocal would overflow), logits are shifted by their row maximum before scaling (so the scaled values are <= 0
and finite or -inf), and the most likely token always survives top-k/top-p. EOS is masked while a row is below
`min_tokens`. A row whose logits are not finite gets `None`: the engine fails that request, not the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.types import SamplingParams

# Below this a temperature is indistinguishable from greedy in fp32 (vLLM uses the same cut-off).
MIN_TEMPERATURE = 1e-5


@dataclass
class RowSampling:
    params: SamplingParams
    generated: int  # tokens generated so far
    generator: torch.Generator | None  # on the logits' device; None: the shared global stream

    @property
    def greedy(self) -> bool:
        return self.params.greedy or self.params.temperature < MIN_TEMPERATURE


def _filter_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    # logits: [B, V] (temperature-scaled, max of each row = 0); top_k: [B] (0 = off); top_p: [B] (1 = off)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    drop = ranks[None, :] >= k[:, None]  # beyond the k largest
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # drop a token when the mass before it already reaches top_p; the first token is never dropped
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def _exponential_noise(rows: Sequence[RowSampling], shape: tuple[int, int], device: torch.device) -> Tensor:
    noise = torch.empty(shape, device=device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    return noise


def _sample_rows(logits: Tensor, rows: Sequence[RowSampling]) -> Tensor:
    # logits: [S, V] finite rows only -> token ids [S]
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=device)
    top_k = torch.tensor([r.params.top_k for r in rows], dtype=torch.long, device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=device)
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # <= 0, the best token at exactly 0
    scaled = _filter_top_k_top_p(shifted / temperature[:, None], top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)  # finite: every row keeps its best token at logit 0
    noise = _exponential_noise(rows, tuple(probs.shape), device)
    return (probs / noise).argmax(dim=-1)


def sample(logits: Tensor, rows: Sequence[RowSampling], eos_token_ids: Sequence[int]) -> list[int | None]:
    """logits: [B, V] float32 -> one token id per row (None where the logits are unusable)."""
    logits = logits.float()
    below_min = [i for i, r in enumerate(rows) if r.generated < r.params.min_tokens]
    if below_min and eos_token_ids:
        logits = logits.clone()
        index = torch.tensor(below_min, device=logits.device)[:, None]
        logits[index, torch.tensor(list(eos_token_ids), device=logits.device)[None, :]] = float("-inf")
    # one pass over [B, V]: a row's max is NaN if any logit is, +inf if any is, -inf if all are (usable: finite)
    best, tokens = logits.max(dim=-1)
    finite = torch.isfinite(best)
    sampled = [i for i, r in enumerate(rows) if not r.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        usable = finite[index]
        # unusable rows are sampled from zeros (harmless) and discarded below
        rows_logits = torch.where(usable[:, None], logits[index], torch.zeros_like(logits[index]))
        tokens[index] = _sample_rows(rows_logits, [rows[i] for i in sampled])
    return [token if ok else None for token, ok in zip(tokens.tolist(), finite.tolist())]


def greedy_continuations(logits: Tensor, rows: Sequence[RowSampling],
                         eos_token_ids: Sequence[int]) -> list[list[int | None]]:
    """logits: [R, T, V] of greedy rows at T positions past the one being sampled now (speculative decoding: the
    positions after the row's draft tokens) -> the argmax at each (None where the logits are unusable). EOS is masked
    at the positions where the row would still be below `min_tokens`, as `sample` does one step at a time."""
    logits = logits.float()
    steps = torch.arange(1, logits.shape[1] + 1, device=logits.device)
    generated = torch.tensor([r.generated for r in rows], device=logits.device)
    min_tokens = torch.tensor([r.params.min_tokens for r in rows], device=logits.device)
    below_min = (generated[:, None] + steps[None, :]) < min_tokens[:, None]  # [R, T]
    if eos_token_ids and bool(below_min.any()):
        eos = torch.tensor(list(eos_token_ids), device=logits.device)
        logits = logits.clone()
        logits[..., eos] = logits[..., eos].masked_fill(below_min[..., None], float("-inf"))
    best, tokens = logits.max(dim=-1)
    finite = torch.isfinite(best)
    return [[token if ok else None for token, ok in zip(row_tokens, row_finite)]
            for row_tokens, row_finite in zip(tokens.tolist(), finite.tolist())]
