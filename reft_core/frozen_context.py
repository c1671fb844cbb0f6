"""What never changes while an intervention trains, computed once per example.

With a frozen model, an edit at layers >= L0 on prompt positions >= q0 cannot change (a) any hidden state below
layer L0 and (b) any state, at any layer, of the positions before q0 (attention is causal). So for each example we
run the model once, without gradients, and keep the keys/values of the first q0 positions at every layer plus the
input to layer L0 for the remaining positions. A training step then runs only layers L0.. on positions q0.. over
that cached prefix: for `l1` on a chat prompt that is the last prompt token plus the completion, instead of the
whole sequence through the whole stack. The result is the same loss as a full forward (tested), just cheaper.

This path drives the model's own decoder with `inputs_embeds`, explicit positions and a pre-filled cache, and
runs only a suffix of its layers; it needs a decoder whose blocks read their layer index from their attention
module (Llama, Mistral, Qwen2, ...). `supports_frozen_context` says whether a model qualifies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from reft_core.hooks import decoder_layers


@dataclass(frozen=True)
class FrozenContext:
    """One example's unchanging part: prefix keys/values per layer and the suffix's input to the first edited layer."""

    start: int  # q0: first position whose states can change
    prefix_keys: tuple[Tensor, ...]  # per layer: [kv_heads, q0, head_dim]
    prefix_values: tuple[Tensor, ...]
    suffix_input: Tensor  # [n - q0, d]: input to layer L0 at positions q0..n-1


def supports_frozen_context(model: nn.Module) -> bool:
    """True for decoders whose blocks find their cache slot by their own layer index and attend to everything."""
    layers = decoder_layers(model)
    indexed = all(getattr(getattr(layer, "self_attn", None), "layer_idx", None) == i for i, layer in enumerate(layers))
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    full_attention = getattr(model.config, "sliding_window", None) is None and layer_types == {"full_attention"}
    return indexed and full_attention and hasattr(model.get_decoder(), "norm")


@torch.no_grad()
def compute_frozen_context(model: nn.Module, input_ids: Sequence[int], start: int, first_layer: int) -> FrozenContext:
    device = next(model.parameters()).device
    captured: list[Tensor] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = decoder_layers(model)[first_layer].register_forward_pre_hook(capture, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        model.get_decoder()(input_ids=torch.tensor([list(input_ids)], device=device), past_key_values=cache, use_cache=True)
    finally:
        handle.remove()
    keys = tuple(layer.keys[0, :, :start].clone() for layer in cache.layers)
    values = tuple(layer.values[0, :, :start].clone() for layer in cache.layers)
    return FrozenContext(start, keys, values, captured[0][0, start:].clone())


@contextmanager
def _layers_from(model: nn.Module, first_layer: int) -> Iterator[None]:
    """Temporarily run only decoder layers `first_layer..` (hooks stay on the same module objects)."""
    inner = model.get_decoder()
    full = inner.layers
    inner.layers = nn.ModuleList(list(full)[first_layer:])
    try:
        yield
    finally:
        inner.layers = full


def forward_suffix(model: nn.Module, contexts: Sequence[FrozenContext], first_layer: int) -> Tensor:
    """Final hidden states [B, S, d] of the suffixes (right-padded to S) over their cached prefixes."""
    device = contexts[0].suffix_input.device
    batch, prefix_len = len(contexts), max(c.start for c in contexts)
    suffix_len = max(c.suffix_input.shape[0] for c in contexts)
    hidden = contexts[0].suffix_input.shape[-1]
    inputs = torch.zeros((batch, suffix_len, hidden), dtype=contexts[0].suffix_input.dtype, device=device)
    mask = torch.zeros((batch, prefix_len + suffix_len), dtype=torch.long, device=device)
    positions = torch.zeros((batch, suffix_len), dtype=torch.long, device=device)
    for row, ctx in enumerate(contexts):  # prefixes are left-padded, suffixes right-padded
        n = ctx.suffix_input.shape[0]
        inputs[row, :n] = ctx.suffix_input
        mask[row, prefix_len - ctx.start : prefix_len + n] = 1
        positions[row] = ctx.start + torch.arange(suffix_len, device=device)
    cache = DynamicCache(config=model.config)
    for layer_index in range(len(contexts[0].prefix_keys)):
        k = torch.stack([_left_pad(c.prefix_keys[layer_index], prefix_len) for c in contexts])
        v = torch.stack([_left_pad(c.prefix_values[layer_index], prefix_len) for c in contexts])
        cache.update(k, v, layer_index)
    with _layers_from(model, first_layer):
        out = model.get_decoder()(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
    return out.last_hidden_state


def _left_pad(tensor: Tensor, length: int) -> Tensor:
    # tensor: [kv_heads, t, head_dim] -> [kv_heads, length, head_dim]
    return nn.functional.pad(tensor, (0, 0, length - tensor.shape[1], 0))
