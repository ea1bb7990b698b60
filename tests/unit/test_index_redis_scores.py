"""How the Redis backend writes a score: the double Redis sorts by, and the exact text it gives back."""

from __future__ import annotations

import pytest

from stagetx.stages.index.redis_backend import _score, _score_parts


@pytest.mark.parametrize(
    "score",
    [0, 7, -7, 2**53 - 1, 2**53, -(2**53), 2**53 + 1, -(2**53) - 1, 10**20, -(10**400), 0.5, -0.0, 3.0, 1e300],
)
def test_the_double_is_the_nearest_one_and_the_text_gives_the_score_back(score: int | float) -> None:
    double, kind, text = _score_parts(score)
    try:
        nearest = float(score)
    except OverflowError:
        nearest = float("inf") if score > 0 else float("-inf")
    assert float(double) == nearest  # what Redis parses and sorts by (ZADD takes "inf" too)
    back = _score(kind + text)
    assert back == score and type(back) is type(score)
