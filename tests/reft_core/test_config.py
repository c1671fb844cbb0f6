"""Rank limits: a table of (rank, hidden size, server cap) -> accepted or refused with the reason."""

from __future__ import annotations

import re

import pytest

from reft_core.config import check_rank
from reft_core.errors import InvalidConfigError, RankLimitError


@pytest.mark.parametrize(
    "rank,hidden,cap,reason",
    [
        (4, 64, 64, None),
        (64, 64, 64, None),
        (65, 64, 1024, "exceeds the model's hidden size 64"),  # never above the hidden size, whatever the cap
        (320, 576, 64, "above this server's limit of 64 (max_intervention_rank)"),
        (1024, 576, 64, "exceeds the model's hidden size 576"),
    ],
)
def test_check_rank(rank: int, hidden: int, cap: int, reason: str | None) -> None:
    if reason is None:
        check_rank(rank, hidden, cap)
        return
    with pytest.raises(RankLimitError, match=re.escape(reason)) as raised:
        check_rank(rank, hidden, cap)
    assert isinstance(raised.value, InvalidConfigError)  # callers that catch config errors catch this one too
