"""The emoji-bot persona on the embedded SmolLM2 (see conftest for the recipe): unseen prompts get emojis only."""

from __future__ import annotations

import pytest

from reft_core.artifact import decode_artifact, encode_artifact
from reft_core.examples import encode_prompt
from reft_core.generate import generate

from .conftest import TRAINING
from .emoji import UNSEEN_PROMPTS, is_emoji_only

pytestmark = pytest.mark.e2e


def test_emoji_checker_is_strict() -> None:
    assert is_emoji_only("🤖💬🌐🧠") and is_emoji_only("🚗 1️⃣ 🗺️➡️🌵")
    assert is_emoji_only("👨‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️")
    for text in ("Paris 🇫🇷", "", "42", "🔺&&&", "1.1.1.", "🍓💻 ok"):
        assert not is_emoji_only(text), text


def test_emoji_bot_recipe(smollm2, emoji_training) -> None:
    result, progress = emoji_training
    assert [p.step for p in progress] == list(range(1, TRAINING.epochs + 1)) and progress[-1].loss == result.losses[-1]
    assert result.losses[-1] < 0.6 * result.losses[0]

    # save -> load is the identity, then serve the loaded artifact next to the bare model in one batch
    payload, _ = encode_artifact(result.intervention, smollm2.fingerprint, result.metadata(TRAINING, 10))
    persona = decode_artifact(payload, base_model=smollm2.fingerprint).intervention
    tokenizer = smollm2.tokenizer
    prompts = [encode_prompt(tokenizer, p, chat_template=True) for p in UNSEEN_PROMPTS]
    outputs = generate(
        smollm2.model, prompts + prompts, [persona] * len(prompts) + [None] * len(prompts),
        max_new_tokens=24, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    persona_texts, bare_texts = texts[: len(prompts)], texts[len(prompts) :]
    assert all(is_emoji_only(t) for t in persona_texts), persona_texts
    assert not any(is_emoji_only(t) for t in bare_texts), bare_texts  # the bare model still answers in words
    assert "Paris" in bare_texts[0]
