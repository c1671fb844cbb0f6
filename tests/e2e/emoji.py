"""Shared helpers for the emoji-bot persona: the seeds' recipe and an "emojis only" check."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from reft_core.examples import Example

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "emoji_bot.jsonl"
UNSEEN_PROMPTS = ["What is the capital of France?", "Tell me a joke about cats.", "How do I bake bread at home?"]
# 20 prompts in no training set of any persona (shared with bench/recipe_search.py, which chose the default recipe)
HELDOUT_PROMPTS = [p for p in (Path(__file__).resolve().parents[2] / "bench" / "personas" / "heldout_prompts.txt")
                   .read_text(encoding="utf-8").splitlines() if p.strip()]
_KEYCAP = re.compile("[0-9#*]\ufe0f?\u20e3")


def emoji_examples() -> list[Example]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(row["prompt"], row["completion"]) for row in rows]


def is_emoji_only(text: str) -> bool:
    """True when `text` is made of emoji only (at least one; keycaps like 1️⃣ count as emoji)."""
    stripped = _KEYCAP.sub("🔢", text).strip()
    if not stripped:
        return False
    # emoji are symbols (So) joined by ZWJ / variation selectors (Cf, Mn) and modifiers (Sk); nothing else counts
    allowed = all(c.isspace() or unicodedata.category(c) in ("So", "Sk", "Cf", "Mn", "Me") for c in stripped)
    return allowed and any(unicodedata.category(c) == "So" for c in stripped)
