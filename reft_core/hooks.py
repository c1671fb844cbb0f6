"""Where interventions meet the model: forward hooks on decoder layers, attached for one forward only.

`block_output` is the residual stream after a decoder layer, i.e. that layer's output. Hooks are attached in this
one place and always removed in `finally`, so a failed forward never leaves an edit behind for the next one
(decode steps and other rows must run the bare model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

LayerEdit = Callable[[Tensor], Tensor]  # h: [B, T, d] -> h': [B, T, d]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama, Mistral, Qwen, Gemma, ... all expose `model.layers`)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find decoder layers on {type(model).__name__}: expected `.model.layers`")
    return layers


def _output_hook(edit: LayerEdit) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        # Some architectures / versions return (hidden_states, ...) instead of a bare tensor.
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


@contextmanager
def editing_layers(model: nn.Module, edits: Mapping[int, LayerEdit]) -> Iterator[None]:
    """Apply `edits[layer]` to the output of each listed decoder layer for the duration of the block."""
    layers = decoder_layers(model)
    handles = []
    try:
        for layer, edit in edits.items():
            handles.append(layers[layer].register_forward_hook(_output_hook(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()
