"""Turns a batch of next-token logits into one token per row, honouring each row's own sampling parameters.

Greedy rows take the argmax (batch-invariant by construction). Sampled rows apply temperature, top-k and top-p,
then draw with the row's own seeded generator when the request gave a seed, so a seeded request's output does not
depend on its batch-mates. EOS is masked while a row is below `min_tokens`. A row whose logits are not finite gets
`None`: the engine fails that request, not the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.types import SamplingParams


@dataclass
class RowSampling:
    params: SamplingParams
    generated: int  # tokens generated so far
    generator: torch.Generator | None


def _filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    # logits: [V] (already temperature-scaled)
    if top_k > 0 and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, rows: Sequence[RowSampling], eos_token_ids: Sequence[int]) -> list[int | None]:
    """logits: [B, V] float32 -> one token id per row (None where the logits are unusable)."""
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=logits.device)
    below_min = [i for i, r in enumerate(rows) if r.generated < r.params.min_tokens]
    if below_min and eos.numel():
        logits = logits.clone()
        logits[torch.tensor(below_min, device=logits.device)[:, None], eos[None, :]] = float("-inf")
    finite = torch.isfinite(logits).any(dim=-1) & ~torch.isnan(logits).any(dim=-1)
    greedy = logits.argmax(dim=-1)
    tokens: list[int | None] = greedy.tolist()
    for i, (row, ok) in enumerate(zip(rows, finite.tolist())):
        if not ok:
            tokens[i] = None
        elif not row.params.greedy:
            scaled = _filter_top_k_top_p(logits[i] / row.params.temperature, row.params.top_k, row.params.top_p)
            probs = torch.softmax(scaled, dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
    return tokens
