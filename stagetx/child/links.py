"""Links between the processes of one server: UNIX sockets in the run directory, full mesh.

Each process listens on ``RUNDIR/gN.sock`` and keeps one outbound link to every other process
(reconnecting with back-off while that process restarts); it sends on its outbound links and
receives on the inbound ones, so each direction of a pair is one ordered stream. A process that
stops says ``["bye"]`` on its inbound links first, so the others log its going as a stop (info),
not as a lost link (warn). Frames for a
process that is not connected wait in a bounded queue; past the bound, ``send`` reports it. So do
frames for a process whose link is ``stalled`` (it reads nothing: frozen, or stuck in a long
handler), which would otherwise pile up in Twisted's write buffer without any bound; once the link
has written out its buffer, the queue follows, in order.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from stagetx.linkqueue import LinkQueue
from stagetx.router import Result, Router
from stagetx.unixport import KeptUNIXPort
from stagetx.wire import (
    FrameTooLarge,
    Link,
    LinkClientFactory,
    LinkServerFactory,
    check_fits,
    message_room,
    pack_message,
    unpack_entries,
)

#: Frames kept for a process that is down (restarting); more are refused with a reason.
PENDING_LIMIT = 100_000
#: ... and runs kept as they came for a process that does not read, at most this many bytes of them.
PENDING_BYTES = 64 * 1024 * 1024
#: How often each process tells the others its queue delay (s).
DELAY_INTERVAL = 0.1
#: What a stopping process says on its inbound links before they close.
BYE = ["bye"]
#: A run that Python builds (``_OpenRun``) is sent once it holds this many messages or bytes
#: (at most half a frame's room).
RUN_MESSAGES = 32
RUN_BYTES = 65536
#: A message larger than this (id, payload and reply; at most a quarter of a frame's room) goes
#: alone, not in a run.
RUN_MESSAGE_BYTES = 16384


def _size(frame: list[Any]) -> int:
    """About the bytes message frame ``["m", instance, msgid, payload, sender, reply]`` adds to a
    run (its strings as characters: UTF-8 may take up to four bytes each, within the margins)."""
    reply = frame[5]
    return len(frame[2]) * 4 + len(frame[3]) + (len(reply) * 4 if reply is not None else 0) + 16


class _Entries:
    """Messages packed back to back (``send_entries``) waiting as they came for a link that does
    not read: a run stays a run."""

    __slots__ = ("data", "count")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count


def _counted_bytes(item: list[Any] | _Entries) -> int:
    """What an item counts against ``PENDING_BYTES``: runs by their bytes; single frames, bounded
    by ``PENDING_LIMIT``, nothing."""
    return len(item.data) if isinstance(item, _Entries) else 0


class _OpenRun:
    """Messages of one sender to one stage instance of another process, sent in a row by Python
    stages and routing: they leave as one run entry (``["r", …]``, ``stagetx.message.Run``), which
    a Lua stage reads in Lua, as runs that Lua stages pack themselves."""

    __slots__ = ("instance", "named", "frames", "size")

    def __init__(self, instance: int, named: Any) -> None:
        self.instance = instance
        self.named = named
        self.frames: list[list[Any]] = []  # each ["m", instance, msgid, payload, sender, reply]
        self.size = 0

    def entry(self) -> bytes:
        body = b"".join([pack_message(f[2]) + pack_message(f[3]) + pack_message(f[5]) for f in self.frames])
        return pack_message(["r", self.instance, self.named, len(self.frames), body])


def socket_path(rundir: str, group: int) -> str:
    return os.path.join(rundir, f"g{group}.sock")


def node_id(group: int) -> str:
    return f"g{group}"


def _group_of(peer_id: str) -> int | None:
    if peer_id.startswith("g") and peer_id[1:].isdigit():
        return int(peer_id[1:])
    return None


def local_retry() -> Callable[[int], float]:
    """Reconnect delays for a link to another process of this machine: 20 ms growing to 1 s,
    with at most 20 ms of jitter. (``backoffPolicy``'s default jitter adds up to a whole second,
    which at start-up held a process's frames for a sibling that long while others already flowed.)
    """
    return backoffPolicy(0.02, 1.0, factor=1.5, jitter=lambda: random.random() * 0.02)


class _Inbound:
    """Frames arriving from other processes go to the router."""

    def __init__(self, links: ProcessLinks) -> None:
        self.links = links

    def link_authenticated(self, link: Link) -> None:
        link.group = _group_of(link.peer_id or "")  # type: ignore[attr-defined]
        if link.group is None:  # type: ignore[attr-defined]
            self.links.log.warn("link from unknown peer {peer!r} refused", peer=link.peer_id)
            link.close()
            return
        self.links.inbound.add(link)

    def message_received(self, link: Link, obj: Any) -> None:
        self.links.router.frame_received(link.group, obj)  # type: ignore[attr-defined]

    def frame_done(self, link: Link) -> None:
        """A whole frame is queued: run it now (``frame_received`` schedules no drain of its own)."""
        self.links.router.run_queue()

    def link_lost(self, link: Link, reason: object) -> None:
        self.links.inbound.discard(link)


class _Outbound:
    """The sending side of the link to one process."""

    def __init__(self, links: ProcessLinks, group: int) -> None:
        self.links = links
        self.group = group

    def link_authenticated(self, link: Link) -> None:
        if link.peer_id != node_id(self.group):
            self.links.log.error(
                "link to process {process} answered as {peer!r}; dropped", process=self.group + 1, peer=link.peer_id
            )
            link.close()
            return
        self.links.connected(self.group, link)

    def message_received(self, link: Link, obj: Any) -> None:
        if obj == BYE:
            self.links.leaving.add(self.group)
            return
        self.links.log.warn("unexpected frame on the link to process {process}", process=self.group + 1)

    def link_drained(self, link: Link) -> None:
        self.links.drained(self.group, link)

    def link_lost(self, link: Link, reason: object) -> None:
        self.links.disconnected(self.group, link)


class ProcessLinks(MultiService):
    """The mesh of links from this process to the other processes of its server."""

    log = Logger()

    def __init__(self, router: Router, rundir: str, groups: int, secret: bytes, reactor: Any, max_frame: int) -> None:
        super().__init__()
        self.router = router
        self.rundir = rundir
        self.group = router.group
        self.secret = secret
        self.reactor = reactor
        self.max_frame = max_frame
        self._out: dict[int, Link] = {}
        self._down: set[int] = set()  # processes whose link dropped and has not come back
        self.inbound: set[Link] = set()  # the other processes' links to this one
        self.leaving: set[int] = set()  # processes that said they stop (their links close next)
        self._stopping = False
        self._pending: dict[int, LinkQueue[list[Any] | _Entries]] = {
            g: LinkQueue(PENDING_LIMIT, PENDING_BYTES, _counted_bytes) for g in range(groups) if g != self.group
        }
        self._runs: dict[int, _OpenRun] = {}  # the run being built per linked process
        self._run_bytes = min(RUN_BYTES, message_room(max_frame) // 2)
        self._run_message_bytes = min(RUN_MESSAGE_BYTES, message_room(max_frame) // 4)
        self._runs_call: Any = None  # the end of this reactor turn, when the runs being built leave
        self._port: KeptUNIXPort | None = None
        self._delay_loop = LoopingCall(self._tell_delay)
        self._delay_loop.clock = reactor
        for group in self._pending:
            endpoint = UNIXClientEndpoint(reactor, socket_path(rundir, group))
            factory = LinkClientFactory(secret, node_id(self.group), _Outbound(self, group), max_frame)
            service = ClientService(endpoint, factory, retryPolicy=local_retry(), clock=reactor)
            service.setServiceParent(self)
        router.links = self

    def startService(self) -> None:
        factory = LinkServerFactory(self.secret, node_id(self.group), _Inbound(self), self.max_frame)
        self._port = KeptUNIXPort(self.reactor, self.reactor, socket_path(self.rundir, self.group), factory)
        self._port.start()
        MultiService.startService(self)
        self._delay_loop.start(DELAY_INTERVAL, now=False)

    def stopService(self) -> Any:
        self._stopping = True
        self.flush()
        for link in list(self.inbound):
            link.send(BYE)
            link.flush()
        if self._delay_loop.running:
            self._delay_loop.stop()
        if self._port is not None:
            self._port.stop()
        return MultiService.stopService(self)

    # -- used by the router -----------------------------------------------------------------------
    def flush(self) -> None:
        """Write what every outbound link has queued (the router calls this after a drain turn)."""
        self._end_runs()
        for link in self._out.values():
            link.flush()

    def _end_runs(self) -> None:
        """Queue the runs being built on their links."""
        if self._runs_call is not None:
            if self._runs_call.active():
                self._runs_call.cancel()
            self._runs_call = None
        for group in list(self._runs):
            self._end_run(group)

    def _end_run(self, group: int) -> None:
        run = self._runs.pop(group, None)
        if run is not None:
            self._out[group].send_entries(run.entry(), 1)

    def _add_to_run(self, group: int, frame: list[Any], size: int) -> None:
        """Add message frame ``["m", instance, msgid, payload, sender, reply]`` (``size``: its
        ``_size``) to the run to its stage, starting a new run when the last one was for another
        stage or sender."""
        instance, named = frame[1], frame[4]
        run = self._runs.get(group)
        if run is None or run.instance != instance or run.named != named:
            if run is not None:
                self._end_run(group)
            run = self._runs[group] = _OpenRun(instance, named)
            if self._runs_call is None:
                self._runs_call = self.reactor.callLater(0, self._end_runs)
        run.frames.append(frame)
        run.size += size
        if len(run.frames) >= RUN_MESSAGES or run.size >= self._run_bytes:
            self._end_run(group)

    def steady_room(self, group: int) -> int:
        """The largest payload a message to ``group`` surely fits in while its link stays
        connected and its queue is under half full (0 otherwise): half a frame, leaving the rest to
        the message's other fields. The other half of the queue takes that turn's runs while the
        process does not read (``send_entries``)."""
        if group in self._out and self._pending[group].has_room():
            return message_room(self.max_frame) // 2
        return 0

    def _takes(self, group: int) -> bool:
        """Frames to ``group`` go to its link now: it is linked, reads, and nothing waits before them."""
        link = self._out.get(group)
        return link is not None and not link.stalled and not self._pending.get(group)

    def reachable(self, group: int) -> bool:
        """False only for a process that was linked and dropped (crashed, restarting).

        A process not linked yet at start-up counts as reachable: its frames wait for the link.
        """
        return group not in self._down

    def send(self, group: int, frame: list[Any]) -> Result:
        """Send ``frame`` to the process of ``group`` now, or queue it while that process is down
        or does not read; a frame too large for a link is refused here, queued or not."""
        try:
            link = self._out.get(group)
            if link is not None and self._takes(group):
                self._write(group, link, frame)
                return True, None
            pending = self._pending.get(group)
            if pending is None:
                return False, f"no process {group + 1} on this server"
            if pending.limit_reached() is not None:
                state = "is not reading" if link is not None else "is down"
                return False, f"process {group + 1} {state} and its queue is full"
            check_fits(frame, self.max_frame)
            if group in self._runs:  # what it holds was accepted before this frame
                self._end_run(group)
        except FrameTooLarge as err:
            return False, str(err)
        pending.append(frame)
        return True, None

    def _write(self, group: int, link: Link, frame: list[Any]) -> None:
        """``frame`` on the link to ``group``: a small message joins the run being built."""
        size = _size(frame) if frame[0] == "m" else 0
        if 0 < size <= self._run_message_bytes:
            self._add_to_run(group, frame, size)
            return
        if group in self._runs:
            self._end_run(group)
        link.send(frame)

    def send_entries(self, group: int, entries: bytes, count: int) -> Result:
        """Send ``count`` message frames packed back to back (``Router.steady``) to the process of
        ``group``, whose link ``steady_room`` said was connected."""
        link = self._out.get(group)
        if group in self._runs:
            self._end_run(group)
        if link is not None and self._takes(group) and link.send_entries(entries, count):
            return True, None
        if link is not None:  # it does not read: they wait as they came, past the bound too
            self._pending[group].append(_Entries(entries, count))
            return True, None
        # the link dropped within the turn (a write failed): the frames wait for it as others do
        for frame in unpack_entries(entries):
            ok, reason = self.send(group, frame)
            if not ok:
                return False, reason
        return True, None

    # -- link events ------------------------------------------------------------------------------
    def connected(self, group: int, link: Link) -> None:
        self._out[group] = link
        self._down.discard(group)
        self.leaving.discard(group)
        for item in self._pending[group].take():
            if isinstance(item, _Entries):
                link.send_entries(item.data, item.count)
            else:
                link.send(item)
        self.log.info("linked to process {group}", group=group + 1)

    def drained(self, group: int, link: Link) -> None:
        """The link to ``group`` wrote out its buffer: what waited for it follows, in order (runs
        as they came, single messages joining runs again)."""
        pending = self._pending[group]
        while pending and self._out.get(group) is link:
            item = pending.popleft()
            if isinstance(item, _Entries):
                if group in self._runs:
                    self._end_run(group)
                link.send_entries(item.data, item.count)
            else:
                self._write(group, link, item)

    def disconnected(self, group: int, link: Link) -> None:
        if self._out.get(group) is link:
            del self._out[group]
            self._down.add(group)
            run = self._runs.pop(group, None)
            if run is not None:  # sent within the turn the link dropped: they wait for it
                self._pending[group].extend(run.frames)
            self.router.delays.pop(group, None)
            if self._stopping or group in self.leaving:
                self.log.info("link to process {group} closed (stopping)", group=group + 1)
            else:
                self.log.warn("link to process {group} lost", group=group + 1)
            if not self._stopping:
                self.router.process_lost(group)

    def _tell_delay(self) -> None:
        try:
            frame = ["delay", self.router.refresh_delay()]
            for link in self._out.values():
                link.send(frame)
        except Exception:
            self.log.failure("telling queue delay failed")
