"""Incremental detokenization and stop-string handling for one sequence.

Text is re-decoded from the generated ids each step (robust for any tokenizer, and cheap at our output lengths)
and released only up to the last complete character: a trailing U+FFFD means a multi-byte character is still
split across tokens. Text that could be the beginning of a stop string is held back until it is decided, so a
client never sees a stop string, not even a prefix of one that ends the output.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already sent
        self.text = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (newly releasable text, whether a stop string was hit)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        stable = len(self.text.rstrip("\ufffd"))
        for stop in self.stop:
            # only in the stable text: a trailing U+FFFD is half a character, not text a stop string could match
            found = self.text.find(stop, max(0, self.emitted - len(stop)), stable)
            if found != -1:
                self.text = self.text[:found]
                return self._release(len(self.text)), True
        hold = max((self._partial_stop_suffix(self.text[:stable], stop) for stop in self.stop), default=0)
        return self._release(max(self.emitted, stable - hold)), False

    def flush(self) -> str:
        """Release everything left (the sequence ended for another reason than a stop string)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        chunk = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return chunk

    @staticmethod
    def _partial_stop_suffix(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                return size
        return 0
