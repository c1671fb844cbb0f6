"""Reference generation with a different intervention per row (the engine is tested against this).

Rows are left-padded into one batch. The prefill forward runs with the batched bank hooked in, so each row's
intervention edits only that row's prompt positions; every decode step then runs the bare model over the KV cache,
which already carries the edit (pyreft's `intervene_on_prompt=True` semantics). Greedy decoding only: this is the
ground truth for equivalence tests, not the serving path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from reft_core.bank import InterventionBank, RowPlacement
from reft_core.hf_compat import cache_kwargs
from reft_core.hooks import decoder_layers, editing_layers
from reft_core.intervention import Intervention


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    position_ids: Tensor  # [B, T]
    offsets: list[int]  # per row: index of the first real token (left padding)
    lengths: list[int]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu") -> PaddedBatch:
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    width = max(lengths)
    offsets = [width - n for n in lengths]
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, offset) in enumerate(zip(prompts, offsets)):
        ids[row, offset:] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, offset:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), mask.to(device), position_ids.to(device), offsets, lengths)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    interventions: Sequence[Intervention | None],
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Greedy-decode each prompt (token ids) under its own intervention (or none); returns the new token ids.

    A row stops at its first EOS (not included in the output) or after `max_new_tokens`.
    """
    if len(prompts) != len(interventions):
        raise ValueError(f"{len(prompts)} prompts but {len(interventions)} interventions")
    device = _model_device(model)
    batch = left_pad(prompts, pad_token_id, device)
    distinct = list({id(i): i for i in interventions if i is not None}.values())
    slot_of = {id(i): slot for slot, i in enumerate(distinct, start=1)}
    bank = InterventionBank.for_interventions(distinct, num_layers=len(decoder_layers(model)), device=device)
    rows = [
        RowPlacement(slot=slot_of[id(i)] if i is not None else 0, prompt_len=n, offset=o)
        for i, n, o in zip(interventions, batch.lengths, batch.offsets)
    ]
    plan = bank.plan(rows)
    cache = DynamicCache(config=model.config)
    with editing_layers(model, bank.edits(plan)):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        )
    stop_ids = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=device,
    )
    attention_mask, next_position = batch.attention_mask, batch.position_ids[:, -1:] + 1
    generated: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tokens = out.logits[:, -1].argmax(-1)  # [B]
        finished |= torch.isin(next_tokens, stop_ids)
        for row, token in enumerate(next_tokens.tolist()):
            if not finished[row]:
                generated[row].append(token)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(prompts), 1))], dim=1)
        out = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position,
            use_cache=True,
            **cache_kwargs(model, cache),
        )
        next_position = next_position + 1
    return generated
