"""What never changes while an intervention trains, computed once per example.

With a frozen model, an edit at layers >= L0 on prompt positions >= q0 cannot change (a) any hidden state below
layer L0 and (b) any state, at any layer, of the positions before q0 (attention is causal). So for each example we
run the model once, without gradients, and keep the keys/values of the first q0 positions at every layer plus the
input to layer L0 for the remaining positions. A training step then runs only layers L0.. on positions q0.. over
that cached prefix: for `l1` on a chat prompt that is the last prompt token plus the completion, instead of the
whole sequence through the whole stack. The result is the same loss as a full forward (tested), just cheaper.

This path calls the model's own decoder layers one by one (`SuffixPass`) with explicit positions and a
pre-filled cache; it needs a decoder whose blocks read their layer index from their attention module and that
exposes its rotary embedding and final norm (Llama, Mistral, Qwen2, ...). `supports_frozen_context` says whether a model qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

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
    decoder = model.get_decoder()
    return indexed and full_attention and hasattr(decoder, "norm") and hasattr(decoder, "rotary_emb")


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


class SuffixPass:
    """Runs decoder layers `first_layer..` one at a time over the examples' suffixes and cached prefixes.

    Layer by layer (rather than one call to the decoder) so that a caller can pause between layers: the server
    interleaves training with serving at that granularity. Nothing on the shared model is mutated, so serving
    forwards in the pauses see the bare model. Inputs are right-padded suffixes over left-padded prefixes.
    """

    def __init__(self, model: nn.Module, contexts: Sequence[FrozenContext], first_layer: int) -> None:
        device = contexts[0].suffix_input.device
        batch, prefix_len = len(contexts), max(c.start for c in contexts)
        suffix_len = max(c.suffix_input.shape[0] for c in contexts)
        hidden = contexts[0].suffix_input.shape[-1]
        inputs = torch.zeros((batch, suffix_len, hidden), dtype=contexts[0].suffix_input.dtype, device=device)
        mask = torch.zeros((batch, prefix_len + suffix_len), dtype=torch.long, device=device)
        positions = torch.zeros((batch, suffix_len), dtype=torch.long, device=device)
        for row, ctx in enumerate(contexts):
            n = ctx.suffix_input.shape[0]
            inputs[row, :n] = ctx.suffix_input
            mask[row, prefix_len - ctx.start : prefix_len + n] = 1
            positions[row] = ctx.start + torch.arange(suffix_len, device=device)
        self.cache = DynamicCache(config=model.config)
        for layer_index in range(len(contexts[0].prefix_keys)):
            k = torch.stack([_left_pad(c.prefix_keys[layer_index], prefix_len) for c in contexts])
            v = torch.stack([_left_pad(c.prefix_values[layer_index], prefix_len) for c in contexts])
            self.cache.update(k, v, layer_index)
        decoder = model.get_decoder()
        self.inputs = inputs  # [B, S, d]: input to `first_layer`
        self.positions = positions
        self.layer_indices = range(first_layer, len(decoder.layers))
        self._layers = decoder.layers
        self._norm = decoder.norm
        self._mask = create_causal_mask(
            config=model.config, inputs_embeds=inputs, attention_mask=mask, past_key_values=self.cache,
            position_ids=positions,
        )
        self._rotary = decoder.rotary_emb(inputs, position_ids=positions)

    def layer(self, index: int, hidden: Tensor) -> Tensor:
        """Output of decoder layer `index` for `hidden` (its input); call in order, each index once."""
        out = self._layers[index](
            hidden, attention_mask=self._mask, position_embeddings=self._rotary, position_ids=self.positions,
            past_key_values=self.cache, use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def norm(self, hidden: Tensor) -> Tensor:
        return self._norm(hidden)


def forward_suffix(model: nn.Module, contexts: Sequence[FrozenContext], first_layer: int) -> Tensor:
    """Final hidden states [B, S, d] of the suffixes (right-padded to S) over their cached prefixes."""
    suffix = SuffixPass(model, contexts, first_layer)
    hidden = suffix.inputs
    for index in suffix.layer_indices:
        hidden = suffix.layer(index, hidden)
    return suffix.norm(hidden)


def _left_pad(tensor: Tensor, length: int) -> Tensor:
    # tensor: [kv_heads, t, head_dim] -> [kv_heads, length, head_dim]
    return nn.functional.pad(tensor, (0, 0, length - tensor.shape[1], 0))
