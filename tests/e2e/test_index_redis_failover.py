"""Sentinel failover under load: a primary, a replica and three Sentinels on loopback; the index
stage keeps setting members while the primary is SIGKILLed. Requests in flight at the crash get
``{error = …}`` entries, never silence, the others wait for the promoted replica; with ``"wait": 1``
every set that was acknowledged is on it; the stage logs the switch."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from stagetx.stages.index.stage import Stage
from tests.integration.test_index_redis import Config, Context, _message
from tests.redis_servers import RedisServer, command, needs_sentinel
from tests.support import LogCapture, wait_for

SERVICE = "games"
IN_FLIGHT = 20
LOAD_SECONDS = 60.0  # bound of the whole load loop


def _sentinel_ready(sentinel: RedisServer) -> bool:
    """This Sentinel sees the replica and the two other Sentinels."""
    try:
        replicas = command(sentinel.port, "SENTINEL", "REPLICAS", SERVICE)
        master = command(sentinel.port, "SENTINEL", "MASTER", SERVICE)
    except OSError:
        return False
    return b"slave" in replicas and b"num-other-sentinels\r\n$1\r\n2" in master


class Load:
    """Sets new members, ``IN_FLIGHT`` requests outstanding, recording which were acknowledged
    (a reply names its member only when it succeeded; replies may come back in any order)."""

    def __init__(self, stage: Any, context: Context) -> None:
        self.stage, self.context = stage, context
        self.acked: list[bytes] = []
        self.errors: list[str] = []
        self.seen = 0  # replies accounted for
        self.outstanding = 0
        self.next = 0

    def pump(self, refill: bool = True) -> None:
        replies = self.context.replies
        for reply in replies[self.seen :]:
            entry = reply[b"set:scores"]
            if "error" in entry:
                self.errors.append(entry["error"])
            else:
                ((member, rank),) = entry.items()
                assert rank >= 1
                self.acked.append(member)
        self.outstanding -= len(replies) - self.seen
        self.seen = len(replies)
        while refill and self.outstanding < IN_FLIGHT:
            self.next += 1
            self.outstanding += 1
            self.stage.receive(_message({"set:scores": {b"m%06d" % self.next: {"i": self.next}}}))
        self.stage.turn_ended()  # what the router does after each chunk of messages

    def answered(self) -> bool:
        return len(self.context.replies) > self.seen


@needs_sentinel
@pytest.mark.parametrize("wait", [0, 1])
@pytest_twisted.ensureDeferred
async def test_a_failover_mid_load_fails_only_requests_in_flight_and_with_wait_loses_no_acknowledged_set(
    tmp_path: Path, wait: int
) -> None:
    """``wait`` 0: only the requests in flight at the crash fail (the others wait for the promoted
    replica), and everything acknowledged by the new primary is there; ``wait`` 1: every
    acknowledged set is there, also those acknowledged by the killed primary."""
    servers: list[RedisServer] = []
    stage: Any = None
    try:
        primary = RedisServer(tmp_path)
        servers.append(primary)
        replica = RedisServer(tmp_path, f"replicaof 127.0.0.1 {primary.port}")
        servers.append(replica)
        monitor = [
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 10000",
        ]
        sentinels = [RedisServer(tmp_path, *monitor, sentinel=True) for _ in range(3)]
        servers += sentinels
        await wait_for(lambda: all(_sentinel_ready(s) for s in sentinels), 30.0, "three Sentinels seeing the replica")

        hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
        url = f"redis+sentinel://{hosts}/{SERVICE}"
        context = Context(str(tmp_path))
        # requests wait for a connection up to the timeout: longer than the failover takes
        settings = {"redis": url, "prefix": f"f{uuid.uuid4().hex[:6]}:", "wait": wait, "timeout": 8000}
        with LogCapture() as log:
            stage = Stage(context, Config(settings))
            await stage.start()
            load = Load(stage, context)
            deadline = time.monotonic() + LOAD_SECONDS

            async def run_until(condition: Any, what: str) -> None:
                while not condition():
                    seen = f"{len(load.acked)} acked, errors {sorted(set(load.errors))[:8]}"
                    assert time.monotonic() < deadline, f"load: timed out waiting for {what}: {seen}"
                    load.pump()
                    # a request may fail at once (e.g. WAIT refused): let the reactor run
                    # (reconnection, replies) before the next round either way
                    await deferLater(reactor, 0.005, lambda: None)
                    await wait_for(load.answered, 10.0, "a reply")

            await run_until(lambda: len(load.acked) >= 300, "300 acknowledged sets")
            primary.kill()
            killed_at = len(load.acked)
            await run_until(lambda: "switched from" in log.text(), "the switch to the promoted replica")
            errors_at_switch, switched_at = len(load.errors), len(load.acked)
            # only now may the old primary come back: back before the failover, it would stay the
            # primary, empty (no persistence), and the replica would copy its emptiness. Sentinel
            # makes it a replica of the promoted one, so sets with WAIT 1 are acknowledged again
            servers.append(RedisServer(tmp_path, port=primary.port))
            await run_until(lambda: len(load.acked) >= killed_at + 300, "300 more acknowledged sets")
            await wait_for(lambda: len(context.replies) == load.seen + load.outstanding, 15.0, "the last replies")
            load.pump(refill=False)

            assert f"to 127.0.0.1:{replica.port}" in log.text()
            assert all(error.startswith("redis: ") for error in load.errors), load.errors[:5]
            if wait == 0:
                assert 0 < len(load.errors) <= IN_FLIGHT, load.errors  # those in flight at the crash
            else:  # and those the promoted replica could not get WAIT 1 for, before the old primary rejoined
                assert errors_at_switch <= IN_FLIGHT, load.errors[:errors_at_switch]
            stage.receive(_message({"get:scores": load.acked, "total:scores": 0}))
            stage.turn_ended()
            await wait_for(load.answered, 20.0, "the check")
            reply = context.replies[-1]
            kept = set(reply[b"get:scores"])
            # wait 0: what the old primary acknowledged may be lost (replication is asynchronous),
            # what the promoted one acknowledged may not
            must = load.acked if wait else load.acked[switched_at:]
            missing = sorted(set(must) - kept)
            assert not missing, f"{len(missing)} acknowledged sets lost, e.g. {missing[:5]}"
    finally:
        if stage is not None:
            await stage.stop()
        for server in servers:
            server.stop()
