"""The ReFT family as pure functions on hidden states.

    LoReFT  h' = h + Rᵀ(W h + b − R h)     R: [r, d] with orthonormal rows
    NoReFT  h' = h + Rᵀ(W h + b − R h)     R unconstrained
    DiReFT  h' = h + Rᵀ(W h + b)           no subtraction, no orthogonality

All three are one *low-rank affine edit* `h' = h + Aᵀ(C h + b)` with A = R and C = W − R (LoReFT, NoReFT) or C = W
(DiReFT). The batched bank stores that folded form so a mixed batch needs one gather and two batched matmuls per
layer whatever the types of its rows. All-zero A, C, b is exactly the identity, and zero-padding the rank is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def loreft(h: Tensor, R: Tensor, W: Tensor, b: Tensor) -> Tensor:
    # h: [..., d]  R, W: [r, d]  b: [r]
    return h + (h @ W.T + b - h @ R.T) @ R


def direft(h: Tensor, R: Tensor, W: Tensor, b: Tensor) -> Tensor:
    return h + (h @ W.T + b) @ R


noreft = loreft  # same formula; only training differs (no orthogonality constraint on R)


def fold(kind: str, R: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return (A, C, b) with `edit(h) = h + (h @ C.T + b) @ A` equal to the `kind` intervention."""
    if kind in ("loreft", "noreft"):
        return R, W - R, b
    if kind == "direft":
        return R, W, b
    raise ValueError(f"unknown intervention type {kind!r}")


def affine_delta(h: Tensor, A: Tensor, C: Tensor, b: Tensor) -> Tensor:
    """Per-entry low-rank edits for gathered states.

    h: [B, P, d]; A, C: [B, P, r, d]; b: [B, P, r]  ->  delta: [B, P, d]
    """
    z = torch.einsum("bpd,bprd->bpr", h, C) + b
    return torch.einsum("bpr,bprd->bpd", z, A)


def gather_positions(h: Tensor, positions: Tensor) -> Tensor:
    # h: [B, T, d]  positions: [B, P] (absolute indices into T)  ->  [B, P, d]
    return h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def add_at_positions(h: Tensor, positions: Tensor, delta: Tensor) -> Tensor:
    """Out-of-place `h[b, positions[b, p]] += delta[b, p]` (autograd-safe; repeated indices accumulate)."""
    # h: [B, T, d]  positions: [B, P]  delta: [B, P, d]
    index = positions.unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return h.scatter_add(1, index, delta.to(h.dtype))
