"""The bounded random campaign (``campaign.py``): quick in the normal run, long under ``soak``."""

from __future__ import annotations

import os
import resource
import time

import pytest

from tests.fuzz.campaign import run_campaign


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


def _check(seed: int, rounds: int, seconds: float) -> None:
    before = _rss_mib()
    report = run_campaign(seed, rounds, seconds)
    grown = _rss_mib() - before
    assert not report.findings, "\n".join(f"{n}: {data!r}: {err}" for n, data, err in report.findings[:10])
    assert all(n >= min(rounds, 500) for n in report.runs.values()), report.runs
    assert grown < 64, f"RSS grew {grown:.0f} MiB over {sum(report.runs.values())} inputs"


def test_quick_campaign_finds_nothing() -> None:
    """Up to 20,000 mutated inputs per decoder, at most 0.4 s each (about 30,000 in all)."""
    _check(seed=10, rounds=20_000, seconds=0.4)


@pytest.mark.soak
def test_long_campaign_finds_nothing() -> None:
    """``STAGETX_FUZZ_SECONDS`` (default 30) per decoder, a new seed each run."""
    seconds = float(os.environ.get("STAGETX_FUZZ_SECONDS", "30"))
    seed = int(os.environ.get("STAGETX_FUZZ_SEED", str(int(time.time()))))
    print(f"campaign seed {seed}")
    _check(seed=seed, rounds=10**9, seconds=seconds)
