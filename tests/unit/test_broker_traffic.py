"""Broker client counters: each count goes to the endpoint and to its stage's totals."""

from __future__ import annotations

from stagetx.broker.traffic import FIELDS, Traffic


def test_counts_reach_the_parent_which_keeps_them_after_the_endpoint_is_gone() -> None:
    stage = Traffic()
    first, second = Traffic(stage), Traffic(stage)
    first.opened(True)
    first.opened(False)
    first.received(3, 30)
    first.sent(12)
    first.dropped()
    first.gone()
    second.opened(True)
    assert first.as_dict() == dict(zip(FIELDS, (1, 1, 1, 3, 1, 30, 12, 1)))
    assert second.as_dict() == dict(zip(FIELDS, (1, 0, 0, 0, 0, 0, 0, 0)))
    assert stage.as_dict() == dict(zip(FIELDS, (2, 1, 1, 3, 1, 30, 12, 1)))
