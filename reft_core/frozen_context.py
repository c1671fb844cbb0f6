"""What never changes while an intervention trains, computed once per example.

With a frozen model, an edit at layers >= L0 on prompt positions >= q0 cannot change (a) any hidden state below
layer L0 and (b) any state, at any layer, of the positions before q0 (attention is causal). So for each example we
run the model once, without gradients, and keep the keys/values of the first q0 positions at layers L0.. (the
layers a training step runs; lower layers' keys/values are never read again) plus the input to layer L0 for the
remaining positions. A training step then runs only layers L0.. on positions q0.. over
that cached prefix: for `l1` on a chat prompt that is the last prompt token plus the completion, instead of the
whole sequence through the whole stack. The result is the same loss as a full forward (tested), just cheaper.

This path calls the model's own decoder layers one by one (`SuffixPass`) with explicit positions and a
pre-filled cache; it needs a decoder whose blocks read their layer index from their attention module and that
exposes its rotary embedding and final norm (Llama, Mistral, Qwen2, ...). `supports_frozen_context` says whether a model qualifies.
`ModelDims.context_nbytes` predicts a context's size from token counts alone, so a caller can budget contexts
(and admit jobs) before computing any.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from reft_core.config import InterventionConfig
from reft_core.examples import TokenizedExample
from reft_core.hf_compat import cache_kwargs
from reft_core.hooks import decoder_layers


@dataclass(frozen=True)
class FrozenContext:
    """One example's unchanging part: prefix keys/values of layers L0.. and the suffix's input to layer L0."""

    start: int  # q0: first position whose states can change
    prefix_keys: tuple[Tensor, ...]  # per layer L0, L0+1, ...: [kv_heads, q0, head_dim]
    prefix_values: tuple[Tensor, ...]
    suffix_input: Tensor  # [n - q0, d]: input to layer L0 at positions q0..n-1

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage this context holds."""
        tensors = (*self.prefix_keys, *self.prefix_values, self.suffix_input)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ModelDims:
    """The few numbers of a decoder that size its activations, read from its config (no forward needed)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    element_size: int  # bytes per element of the model's dtype

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelDims:
        config = model.config
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=len(decoder_layers(model)),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(getattr(config, "intermediate_size", None) or 4 * config.hidden_size),
            num_heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            vocab_size=int(config.vocab_size),
            element_size=next(model.parameters()).element_size(),
        )

    def kv_bytes_per_token(self, layers: int) -> int:
        """Keys + values of one position at `layers` layers."""
        return 2 * layers * self.kv_heads * self.head_dim * self.element_size

    def context_nbytes(self, length: int, start: int, first_layer: int) -> int:
        """What `FrozenContext.nbytes` will be for a `length`-token example whose states change from `start` on."""
        prefix = start * self.kv_bytes_per_token(self.num_layers - first_layer)
        return prefix + (length - start) * self.hidden_size * self.element_size


def first_changing_position(config: InterventionConfig, example: TokenizedExample) -> int:
    """q0: the earliest position an edit can affect; also no later than the first position that predicts a label."""
    prompt_len = len(example.prompt_ids)
    edited = [p for group in config.groups for p in config.positions_for(group, prompt_len)]
    return min(edited + [prompt_len - 1])


def supports_frozen_context(model: nn.Module) -> bool:
    """True for decoders whose blocks find their cache slot by their own layer index and attend to everything."""
    layers = decoder_layers(model)
    indexed = all(getattr(getattr(layer, "self_attn", None), "layer_idx", None) == i for i, layer in enumerate(layers))
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    full_attention = getattr(model.config, "sliding_window", None) is None and layer_types == {"full_attention"}
    decoder = model.get_decoder()
    return indexed and full_attention and hasattr(decoder, "norm") and hasattr(decoder, "rotary_emb")


def frozen_context_work(
    model: nn.Module, input_ids: Sequence[int], start: int, first_layer: int
) -> Generator[None, None, FrozenContext]:
    """Compute one example's `FrozenContext`, pausing (yielding) after every decoder layer.

    Two passes, each a plain causal forward: the whole sequence through layers below `first_layer` (the suffix's
    input to `first_layer`), then only the prefix positions through the layers from `first_layer` up (their K/V;
    prefix positions never attend to later ones, so running them alone is exact).
    """
    # Grad mode is thread state: it is set per slice here, never held across a yield. A caller that stops between
    # slices (a cancelled or taken-over training job) would otherwise leave its thread without gradients.
    work = _frozen_context_slices(model, input_ids, start, first_layer)
    while True:
        with torch.no_grad():
            try:
                next(work)
            except StopIteration as finished:
                return finished.value
        yield


def _frozen_context_slices(
    model: nn.Module, input_ids: Sequence[int], start: int, first_layer: int
) -> Generator[None, None, FrozenContext]:
    """`frozen_context_work`'s computation, to be resumed under `torch.no_grad()`."""
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], device=device)
    lower = _CausalPass(model, decoder.embed_tokens(ids))
    hidden = lower.inputs
    for index in range(first_layer):
        hidden = lower.layer(index, hidden)
        yield
    del lower  # its keys/values are not needed again: the suffix starts from `suffix_input` at `first_layer`
    keys: list[Tensor] = []
    values: list[Tensor] = []
    suffix_input = hidden[0, start:].clone()
    if start:
        upper = _CausalPass(model, hidden[:, :start])
        prefix = upper.inputs
        for index in range(first_layer, len(decoder.layers)):
            prefix = upper.layer(index, prefix)
            keys.append(upper.cache.layers[index].keys[0].clone())
            values.append(upper.cache.layers[index].values[0].clone())
            yield
    else:  # no prefix: upper layers have no cached positions
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        nothing = hidden.new_zeros((kv_heads, 0, head_dim))
        keys += [nothing] * (len(decoder.layers) - first_layer)
        values += [nothing] * (len(decoder.layers) - first_layer)
    return FrozenContext(start, tuple(keys), tuple(values), suffix_input)


def compute_frozen_context(model: nn.Module, input_ids: Sequence[int], start: int, first_layer: int) -> FrozenContext:
    work = frozen_context_work(model, input_ids, start, first_layer)
    while True:
        try:
            next(work)
        except StopIteration as finished:
            return finished.value


class _LayerRunner:
    """Calls decoder layers one at a time with a prepared mask, rotary embedding and cache (no shared state)."""

    def __init__(self, model: nn.Module, inputs: Tensor, attention_mask: Tensor, positions: Tensor,
                 cache: DynamicCache, first_layer: int = 0) -> None:
        decoder = model.get_decoder()
        self.inputs, self.positions, self.cache = inputs, positions, cache
        self._layers = decoder.layers
        # The mask's width is read from `first_layer`'s cache: layers below it may hold nothing (see SuffixPass).
        self._mask = create_causal_mask(
            config=model.config, inputs_embeds=inputs, attention_mask=attention_mask, position_ids=positions,
            layer_idx=first_layer, **cache_kwargs(create_causal_mask, cache),
        )
        self._rotary = decoder.rotary_emb(inputs, position_ids=positions)

    def layer(self, index: int, hidden: Tensor) -> Tensor:
        """Output of decoder layer `index` for `hidden` (its input); call in order, each index once."""
        out = self._layers[index](
            hidden, attention_mask=self._mask, position_embeddings=self._rotary, position_ids=self.positions,
            use_cache=True, **cache_kwargs(self._layers[index], self.cache),
        )
        return out[0] if isinstance(out, tuple) else out


class _CausalPass(_LayerRunner):
    """One unpadded sequence from position 0 with an empty cache."""

    def __init__(self, model: nn.Module, inputs: Tensor) -> None:
        length = inputs.shape[1]
        positions = torch.arange(length, device=inputs.device).unsqueeze(0)
        mask = torch.ones((1, length), dtype=torch.long, device=inputs.device)
        super().__init__(model, inputs, mask, positions, DynamicCache(config=model.config))


class SuffixPass(_LayerRunner):
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
        cache = DynamicCache(config=model.config)  # layers below `first_layer` never run here: left empty
        for offset in range(len(contexts[0].prefix_keys)):
            k = torch.stack([_left_pad(c.prefix_keys[offset], prefix_len) for c in contexts])
            v = torch.stack([_left_pad(c.prefix_values[offset], prefix_len) for c in contexts])
            cache.update(k, v, first_layer + offset)
        super().__init__(model, inputs, mask, positions, cache, first_layer)
        decoder = model.get_decoder()
        self.layer_indices = range(first_layer, len(decoder.layers))
        self._norm = decoder.norm

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
