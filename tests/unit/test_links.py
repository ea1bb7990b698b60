"""Process links: the reconnect policy between processes of one machine."""

from __future__ import annotations

from stagetx.child.links import local_retry


def test_a_sibling_process_is_retried_within_tens_of_milliseconds_and_at_most_every_second() -> None:
    """At start-up a process dials siblings that may not listen yet: the first retries come
    quickly (a frame for that sibling waits no longer than that), later ones back off to 1 s."""
    policy = local_retry()
    delays = [policy(attempt) for attempt in range(40)]
    assert 0.02 <= delays[0] <= 0.04
    assert sum(delays[:5]) < 0.5
    assert max(delays) <= 1.02
    assert delays[-1] >= 1.0
