"""Speculative decoding by n-gram lookup ("prompt lookup decoding"): no draft model, the row's own tokens are the
draft.

A greedy row's last few tokens often occurred before, in its prompt (a name, a phrase to quote, code to edit) or in
its own output (lists, repeated structure, loops). `NgramProposer` finds the latest earlier occurrence of the row's
last n tokens (n from `max_n` down to `min_n`) and proposes what followed it there. The engine feeds the row's last
token and the draft in one forward (`ModelRunner.decode_drafts`); position t's logits are what the model would have
predicted after the t-th of those inputs, so `accept_drafts` keeps the draft's longest prefix that greedy decoding
would have produced itself, plus the model's own next token. A step then yields 1 + accepted tokens for the price
of one forward a few tokens wider: a decode forward reads every weight once whatever its width, so on a GPU (and on
a CPU for a few rows) those extra tokens cost little.

Only greedy rows draft: their output is the same token for token (within the float differences between a forward
one token wide and one a few tokens wide). Sampled rows decode one token per step, in the same forward.
"""

from __future__ import annotations

from collections.abc import Sequence

ACCEPTANCE_WEIGHT = 0.2  # of the latest guess in `NgramProposer.acceptance`: about the last 5-10 tokens count


class NgramProposer:
    """Drafts one row's next tokens from its prompt and output so far. Owned by the row's `Sequence`.

    The lookup table maps each n-gram to where its latest occurrence ended; it is extended as tokens arrive (each
    token is indexed once), so a proposal costs a few dict lookups whatever the row's length.

    `acceptance` estimates how often a draft token would stand: before taking in each output token, the proposer
    guesses it, and scores the guess (no guess scores a miss). The guess costs a dict lookup, so every step of a
    row scores it, drafted or not: a row can start drafting when its output turns repetitive."""

    def __init__(self, prompt_ids: Sequence[int], min_n: int = 1, max_n: int = 3) -> None:
        assert 1 <= min_n <= max_n
        self.min_n, self.max_n = min_n, max_n
        self._tokens = list(prompt_ids)
        self._generated_seen = 0
        # one table per n: n-gram -> index just after its latest occurrence (the start of the continuation)
        self._latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self._indexed = 0  # n-grams ending before this index are in the tables
        self.acceptance = 0.0  # moving average of guesses that were right

    def sync(self, generated: Sequence[int]) -> None:
        """Take in the row's output tokens not seen yet (`generated` is the whole output so far)."""
        for token in generated[self._generated_seen :]:
            right = self.propose(1) == [token]
            self.acceptance = (1 - ACCEPTANCE_WEIGHT) * self.acceptance + ACCEPTANCE_WEIGHT * right
            self._tokens.append(token)
        self._generated_seen = len(generated)

    def propose(self, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest earlier occurrence of the longest suffix found
        (at least `min_n` tokens); [] when there is none."""
        if max_tokens <= 0:
            return []
        self._index()
        tokens = self._tokens
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(tokens) <= n:
                continue
            start = self._latest[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + max_tokens]
        return []

    def _index(self) -> None:
        # Every n-gram that ends before the last token: the suffix itself must not be found (its continuation is
        # what we are asking for).
        tokens, last = self._tokens, len(self._tokens) - 1
        for end in range(self._indexed, last):  # `end`: index of the n-gram's last token
            for n, table in self._latest.items():
                if end + 1 >= n:
                    table[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self._indexed = max(self._indexed, last)


def accept_drafts(draft: Sequence[int], targets: Sequence[int | None]) -> list[int | None]:
    """The tokens a row emits after a forward over [last token, *draft]: `targets[t]` is the model's choice after
    input t (None: its logits were unusable). Draft token t stands while it equals the model's choice before it;
    the row emits the choices up to the first draft token that does not (so at least `targets[0]`, at most one more
    than the draft)."""
    assert len(targets) == len(draft) + 1
    emitted = [targets[0]]
    for drafted, target in zip(draft, targets[1:]):
        if emitted[-1] is None or drafted != emitted[-1] or target is None:
            break
        emitted.append(target)
    return emitted
