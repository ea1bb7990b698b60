"""Sentinel failover under load: a primary, a replica and three Sentinels on loopback; the index
stage (``"wait": 1``) keeps setting members while the primary is SIGKILLed. Every set that was
acknowledged is on the promoted replica; requests in flight at the crash get ``{error = …}``
entries, never silence; the stage logs the switch."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from stagetx.stages.index import Stage
from tests.redis_servers import RedisServer, command, needs_sentinel
from tests.support import LogCapture, wait_for
from tests.unit.test_index_redis import Config, Context, _message

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
@pytest_twisted.ensureDeferred
async def test_every_acknowledged_set_survives_the_primary_killed_mid_load(tmp_path: Path) -> None:
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
        settings = {"redis": url, "prefix": f"f{uuid.uuid4().hex[:6]}:", "wait": 1, "timeout": 2000}
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
                    # a request fails at once while no connection is up: let the reactor run
                    # (reconnection, replies) before the next round either way
                    await deferLater(reactor, 0.005, lambda: None)
                    await wait_for(load.answered, 10.0, "a reply")

            await run_until(lambda: len(load.acked) >= 300, "300 acknowledged sets")
            primary.kill()
            killed_at = len(load.acked)
            await run_until(lambda: "switched from" in log.text(), "the switch to the promoted replica")
            # only now may the old primary come back: back before the failover, it would stay the
            # primary, empty (no persistence), and the replica would copy its emptiness. Sentinel
            # makes it a replica of the promoted one, so sets with WAIT 1 are acknowledged again
            servers.append(RedisServer(tmp_path, port=primary.port))
            await run_until(lambda: len(load.acked) >= killed_at + 300, "300 more acknowledged sets")
            await wait_for(lambda: len(context.replies) == load.seen + load.outstanding, 15.0, "the last replies")
            load.pump(refill=False)

            assert f"to 127.0.0.1:{replica.port}" in log.text()
            assert load.errors  # the requests in flight at the crash, answered with errors
            assert all(error.startswith("redis: ") for error in load.errors), load.errors[:5]
            stage.receive(_message({"get:scores": load.acked, "total:scores": 0}))
            stage.turn_ended()
            await wait_for(load.answered, 10.0, "the check")
            reply = context.replies[-1]
            missing = sorted(set(load.acked) - set(reply[b"get:scores"]))
            assert not missing, f"{len(missing)} acknowledged sets lost, e.g. {missing[:5]}"
            assert reply[b"total:scores"] >= len(load.acked)
    finally:
        if stage is not None:
            await stage.stop()
        for server in servers:
            server.stop()
