"""Tiny, fully local model pieces for tests: a random-weight Llama and a byte-level tokenizer with a chat template.

Nothing here touches a hub or a GPU. The tokenizer maps every byte to one token (256 ids) plus three specials, so
any unicode text round-trips, and it carries a ChatML template like SmolLM2's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HIDDEN = 64
LAYERS = 4
TOKENIZER_VOCAB = 259  # 256 bytes + <|im_start|>, <|im_end|>, <|endoftext|>
VOCAB = 260

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llama(seed: int = 0, std: float = 0.1, vocab: int = VOCAB) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=std,  # larger than default so greedy continuations are not one repeated token
    )
    if vocab >= TOKENIZER_VOCAB:  # ids of tiny_tokenizer's specials
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 256, 257, 257
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {"bos_token": "<|im_start|>", "additional_special_tokens": ["<|im_end|>"], "eos_token": "<|endoftext|>"}
    )
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model_dir(directory: Path, seed: int = 0) -> Path:
    """A local HF model directory (weights + tokenizer) for code paths that load from disk."""
    tiny_llama(seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
