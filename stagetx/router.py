"""Where a message goes: replica choice, broadcast, replies, ordered locks, the process run queue.

The router of one process knows every stage instance of its server (from ``#startup``) and which
process hosts it. Messages for stages of this process go through one FIFO run queue, drained on
the reactor in time slices (so handlers never nest and order is kept); messages for other
processes go out on that process's link (``stagetx.child.links``). The cluster layer plugs in as
``remote`` for ``+``/``*`` scopes, reply addresses of other servers and ``{id, addr}`` targets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from stagetx.address import (
    Address,
    AddressError,
    LocalAsync,
    LockAcquire,
    LockExtend,
    LockRelease,
    ReplyTo,
    Scope,
    ToServer,
    ToStage,
    format_reply,
    parse_target,
)
from stagetx.bounded import BoundedDict
from stagetx.cluster.directory import Replica, Routes, cluster_address
from stagetx.codec import unpack_py
from stagetx.locks import LockTable, Turn
from stagetx.message import CLUSTER_WAY, Message, Run, Sender
from stagetx.wire import pack_message

#: The lock authority of a server is the process of its first #startup group.
LOCK_GROUP = 0
#: A replica is skipped while its process's queue delay is this much above the best one's (s).
SLOW_MARGIN = 0.050
#: Senders of frames from other processes kept as ``Sender`` values, at most this many.
SENDER_CACHE = 4096
#: Reply addresses ``^SERVER/INSTANCE/ID`` made for senders of this process, at most this many.
REPLY_CACHE = 4096
#: One drain turn of the run queue runs at most this long before yielding to the reactor (s).
DRAIN_SLICE = 0.020
#: Messages per chunk of a drain turn: after each chunk, batching stages end their turn and what
#: was sent leaves, so the process that receives it works while this one runs the next chunk
#: (whole-turn batches kept two busy processes in lock step, each idle half the time). Measured
#: with 64 requests in flight between two Lua stages: 16 and 24 left more frames per request,
#: 48 and more brought back some of the lock step. A stage whose messages cost more (the index's
#: requests) may ask for shorter chunks (``Receiver.chunk``): its answers then leave sooner.
DRAIN_CHUNK = 32
#: A drain turn looks at the time it has taken after the chunk that brings its count to this many
#: messages more than at the last look.
SLICE_CHECK = 64

#: Consecutive runs from one sender to one stage are joined while queued, up to this many bytes:
#: a stage answering a run of requests sends its answers as one run, so runs that arrive split
#: would otherwise stay split, one crossing into Lua each.
RUN_JOIN_BYTES = 65536
#: What ``steady_room`` allows for a stage of this process: a local message has no frame limit.
LOCAL_ROOM = 1 << 40

Result = tuple[bool, str | None]
#: A run entry's parts for one steady address (``Router.run_parts``): head, msgid, reply, server, reroute.
RunParts = tuple[bytes, bytes, bytes, str | None, str | None]


class Receiver(Protocol):
    """A stage as the router sees it (``stagetx.child.host.StageHost``)."""

    instance: int
    stage_id: str
    sender: Sender

    def receive(self, message: Message) -> None: ...

    # A receiver may also take several messages in one call: ``receive_batch(messages)``.

    batches: bool  # True when the stage wants ``turn_ended`` after each drain turn it took part in
    runs: bool  # True when the stage takes runs (``receive_run``) rather than their messages one by one
    chunk: int  # a chunk with its messages ends after this many (``DRAIN_CHUNK``, or fewer: see there)

    def receive_run(self, run: Run, limit: int) -> int:
        """Deliver up to ``limit`` messages of ``run`` from ``run.pos`` on (advancing it); returns
        how many were delivered, at least one."""

    def turn_ended(self) -> None: ...


class Links(Protocol):
    """Links to the other processes of this server (``stagetx.child.links.ProcessLinks``)."""

    def reachable(self, group: int) -> bool: ...

    def send(self, group: int, frame: list[Any]) -> Result: ...

    def flush(self) -> None: ...

    def steady_room(self, group: int) -> int: ...

    def send_entries(self, group: int, entries: bytes, count: int) -> Result: ...


class Remote(Protocol):
    """The cluster (``stagetx.cluster.gateway``): other servers' replicas and a way to reach them."""

    routes: Routes

    def send(
        self,
        server_id: str,
        frame: list[Any] | bytes,
        reroute: str | None = None,
        deadline: float | None = None,
        steady: bool = False,
    ) -> Result:
        """Send ``frame`` (bytes: packed already) to server ``server_id``; ``reroute``: the stage id
        it may go to instead; ``steady``: a run that ``steady_room`` promised room for this turn."""

    def process_frame(self, group: int, frame: list[Any]) -> None:
        """A cluster frame (``cx``, ``croutes``) from another process of this server."""

    def steady_room(self, server_id: str) -> int:
        """The largest payload a message to ``server_id`` surely takes the same way until the
        reactor runs again (its link is up), or 0 (see ``Router.steady_room``)."""


#: Frame kinds between the processes of a server that belong to the cluster layer.
CLUSTER_FRAMES = frozenset(("cx", "croutes"))


class Router:
    """Routing for one process.

    @param server_id: this server's id (part of every reply address).
    @param group: this process's ``#startup`` index.
    @param placement: for every instance of the server, in order, ``(stage id, group)``.
    """

    log = Logger()

    def __init__(
        self,
        server_id: str,
        group: int,
        placement: list[tuple[str, int]],
        clock: IReactorTime,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server_id = server_id
        self.group = group
        self.clock = clock
        self.now = now
        # reply addresses made, by (instance, id)
        self._replies: BoundedDict[tuple[int, str], str] = BoundedDict(REPLY_CACHE)
        self._placement = placement
        self._replicas: dict[str, list[int]] = {}
        for instance, (stage_id, _) in enumerate(placement):
            self._replicas.setdefault(stage_id, []).append(instance)
        # round-robin positions per stage id: in its list of this server's replicas (``_choose``),
        # and in the candidate list of this server's and other servers' replicas (``_one_of``)
        self._local_turn: dict[str, int] = {}
        self._cluster_turn: dict[str, int] = {}
        self.local: dict[int, Receiver] = {}
        self.links: Links | None = None
        self.remote: Remote | None = None
        self.delays: dict[int, float] = {}  # group -> last reported queue delay (s)
        self.delay = 0.0  # this process's queue delay, smoothed (s)
        self._queue: deque[tuple[Receiver, Message | Run]] = deque()
        self._drain_call: IDelayedCall | None = None
        self._draining = False
        #: The number of the drain turn running, None outside one: entries into a Lua stage of
        #: one turn keep their steady routes across each other (the reactor does not run meanwhile).
        self.turn: int | None = None
        self._turns = 0
        self._unknown: set[str] = set()
        self._senders: BoundedDict[tuple[Any, ...], Sender] = BoundedDict(SENDER_CACHE)  # frames name senders as lists
        # every stage of this server as a sender; a message frame between this server's processes
        # names such a sender by its instance number (see ``sender_of``)
        self._own = [Sender(server_id, g, stage_id, i) for i, (stage_id, g) in enumerate(placement)]
        self.locks = LockTable(clock, self._grant) if group == LOCK_GROUP else None

    def attach(self, receiver: Receiver) -> None:
        self.local[receiver.instance] = receiver

    def process_lost(self, group: int) -> None:
        """The process of ``group`` went away (killed, crashed, stopped). A restarted one has the
        same replica addresses, so stages keeping state per replica (route, ticket) must drop the
        dead one's now, or its successor inherits it: each local stage with ``replicas_lost``
        gets the lost ``(server, instance)`` pairs."""
        lost = frozenset((self.server_id, i) for i, (_, g) in enumerate(self._placement) if g == group)
        for receiver in list(self.local.values()):
            forget = getattr(receiver, "replicas_lost", None)
            if forget is not None:
                forget(lost)

    def sender_of(self, instance: int) -> Sender:
        """The sender of this server's stage ``instance``: give its messages this very object, and
        frames to other processes carry just the instance number for it."""
        return self._own[instance]

    # -- sending ----------------------------------------------------------------------------------
    def send(self, sender: Sender, address: Address, payload: bytes, reply_to: str | None = None) -> Result:
        """Route one message from ``sender``; ``reply_to`` overrides the address's reply id."""
        kind = type(address)
        if kind is ToStage:
            return self._to_stage(sender, address, payload, reply_to)  # type: ignore[arg-type]
        if kind is ReplyTo:
            return self._to_reply(sender, address, payload, reply_to)  # type: ignore[arg-type]
        if kind is LocalAsync:
            reply = reply_to or address.reply  # type: ignore[union-attr]
            return self.deliver(sender.instance, address.msgid, payload, sender, self._reply(sender, reply))  # type: ignore[union-attr]
        if kind is LockAcquire:
            return self._lock(["acquire", address.cmd, sender.instance, address.reply, payload])  # type: ignore[union-attr]
        if kind is LockExtend:
            values = unpack_py(payload)
            ms = values[0] if values and isinstance(values[0], (int, float)) else 0
            return self._lock(["extend", address.cmd, sender.instance, ms])  # type: ignore[union-attr]
        if kind is LockRelease:
            return self._lock(["release", address.cmd, sender.instance])  # type: ignore[union-attr]
        if kind is ToServer:
            if self.remote is None:
                return False, "no cluster: this server has no peers"
            return self._to_server(sender, address, payload, reply_to)  # type: ignore[arg-type]
        return False, f"{type(address).__name__} cannot be sent from here"

    def steady_room(self, sender: Sender, address: Address) -> int:
        """The largest payload (bytes) that ``address`` from ``sender`` surely takes the same way
        as the message just sent, until the reactor runs again; 0 when it may not.

        Only addresses that reach one stage instance with no choice are steady: in this process,
        in another one over a connected link (its frames are written as queued, so nothing but the
        frame limit refuses them), or on the one other server that has the stage id, while its
        link is up. Round-robin, broadcast, and processes or servers down or not linked yet are
        decided per message.
        """
        return self._steady(sender, address)[0]

    def steady(self, sender: Sender, address: Address) -> tuple[int, int] | None:
        """``(room, way)`` for an ``address`` that ``steady_room`` calls steady, else None:
        ``way`` is the process whose link carries it when that is another process of this server,
        ``CLUSTER_WAY`` for a stage of another server (messages to either can be packed
        beforehand as a run, see ``run_parts``), -1 for a stage of this process."""
        room, instance, server = self._steady(sender, address)
        if not room:
            return None
        if server is not None:
            return room, CLUSTER_WAY
        if instance in self.local:
            return room, -1
        return room, self._placement[instance][1]  # type: ignore[index]

    def _steady(self, sender: Sender, address: Address) -> tuple[int, int | None, str | None]:
        """``steady_room``, the stage instance the address reaches, and the server that has it
        (None: this one)."""
        kind = type(address)
        if kind is ToStage:
            scope = address.scope  # type: ignore[union-attr]
            if scope is Scope.ALL:
                return 0, None, None
            stage_id = address.stage if address.stage is not None else sender.stage  # type: ignore[union-attr]
            replicas = self._replicas.get(stage_id)
            far = self._remote_targets(stage_id, scope, bool(replicas))  # as ``_to_stage`` asks
            if scope is Scope.REMOTE:
                replicas = None
            if far:  # only one server has it, and not this one: no choice to make
                if replicas or len(far) != 1:
                    return 0, None, None
                server, instance = far[0]
                return self.remote.steady_room(server), instance, server  # type: ignore[union-attr]
            if not replicas or len(replicas) != 1:
                return 0, None, None
            instance = replicas[0]
        elif kind is ReplyTo:
            instance, server = address.instance, address.server  # type: ignore[union-attr]
            if server != self.server_id:
                return (0 if self.remote is None else self.remote.steady_room(server)), instance, server
            if not 0 <= instance < len(self._placement):
                return 0, None, None
        else:
            return 0, None, None
        if instance in self.local:
            return LOCAL_ROOM, instance, None
        if self.links is None:
            return 0, instance, None
        return self.links.steady_room(self._placement[instance][1]), instance, None

    def run_parts(self, sender: Sender, address: ToStage | ReplyTo) -> RunParts:
        """For an ``address`` that ``steady`` sends to another process or server: ``(head, msgid,
        reply, server, reroute)``. ``head``, ``msgid`` and ``reply`` are msgpack pieces of a run
        entry (``["r", INSTANCE, SENDER, COUNT, BODY]``, see ``frame_received``): ``head`` is the
        entry up to COUNT, and BODY holds per message ``msgid + msgpack bin(payload) + reply``.
        ``server`` is the other server it goes to (None: a process of this one), ``reroute`` the
        stage id its messages may go to instead if that server goes away. The parts stay the same
        while the address is steady."""
        _, instance, server = self._steady(sender, address)
        if type(address) is ToStage:
            msgid = f"{sender.stage}:{address.msgid}" if address.tag_sender else address.msgid
            reply = self._reply(sender, address.reply)
            reroute = address.stage if address.stage is not None else sender.stage
        else:
            msgid, reply, reroute = address.msgid, None, None
        head = b"\x95" + pack_message("r") + pack_message(instance) + pack_message(self._named(sender))
        return head, pack_message(msgid), pack_message(reply), server, reroute if server is not None else None

    def send_run(self, group: int, entry: bytes) -> Result:
        """Send a run entry packed by its sender (see ``run_parts``) to the process of ``group``."""
        if self.links is None:
            return False, "no links to other processes"
        return self.links.send_entries(group, entry, 1)

    def send_far_run(self, server: str, entry: bytes, reroute: str | None) -> Result:
        """Send a run entry packed by its sender (see ``run_parts``) to ``server``."""
        if self.remote is None:
            return False, "no cluster: this server has no peers"
        return self.remote.send(server, entry, reroute, steady=True)

    def _reply(self, sender: Sender, reply: str | None) -> str | None:
        """The reply address for ``reply``: a message id of the sender, or a full ``^…`` address."""
        if reply is None or reply.startswith("^"):
            return reply
        key = (sender.instance, reply)
        address = self._replies.get(key)
        if address is None:
            address = self._replies.put(key, format_reply(self.server_id, sender.instance, reply))
        return address

    def _to_stage(self, sender: Sender, address: ToStage, payload: bytes, reply_to: str | None) -> Result:
        stage_id = address.stage if address.stage is not None else sender.stage
        replicas = self._replicas.get(stage_id)
        far = self._remote_targets(stage_id, address.scope, bool(replicas))
        if address.scope is Scope.REMOTE:
            replicas = None
        if not replicas and not far:
            busy = self.remote.routes.overloaded.get(stage_id) if self.remote is not None else None
            if busy:  # only overloaded servers have it: say so, it is temporary
                return False, f"no replica of '{stage_id}' available: server {', '.join(busy)} overloaded"
            if address.scope is Scope.REMOTE:
                return False, f"no replica of '{stage_id}' on other servers"
            if stage_id not in self._unknown:
                self._unknown.add(stage_id)
                self.log.warn("message for unknown stage {stage!r} (logged once)", stage=stage_id)
            return False, f"unknown stage '{stage_id}'"
        msgid = f"{sender.stage}:{address.msgid}" if address.tag_sender else address.msgid
        reply = self._reply(sender, reply_to or address.reply)
        if address.scope is Scope.ALL:
            results = [self.deliver(i, msgid, payload, sender, reply) for i in replicas or ()]
            results += [self._send_far(s, i, msgid, payload, sender, reply, None) for s, i in far]
            failed = [reason for ok, reason in results if not ok]
            return (True, None) if len(failed) < len(results) else (False, failed[0])
        if not far:
            return self.deliver(self._choose(stage_id, replicas), msgid, payload, sender, reply)  # type: ignore[arg-type]
        if not replicas and len(far) == 1:  # one replica elsewhere (a "+" to a single peer): no choice
            return self._send_far(*far[0], msgid, payload, sender, reply, stage_id)
        return self._one_of(stage_id, replicas or [], far, msgid, payload, sender, reply)

    # -- other servers ----------------------------------------------------------------------------
    def _remote_targets(self, stage_id: str, scope: Scope, has_local: bool) -> list[Replica]:
        """Replicas of ``stage_id`` on other servers that ``scope`` may use (none without a cluster)."""
        if self.remote is None or scope is Scope.LOCAL:
            return []
        return self.remote.routes.targets(stage_id, has_local, scope is Scope.REMOTE)

    def _one_of(
        self,
        stage_id: str,
        local: list[int],
        far: list[Replica],
        msgid: str,
        payload: bytes,
        sender: Sender,
        reply: str | None,
    ) -> Result:
        """Round-robin over this server's replicas and other servers', skipping clearly slower ones."""
        assert self.remote is not None
        if not local and len(far) == 1:  # one replica elsewhere (a "+" to a single peer): no choice
            return self._send_far(*far[0], msgid, payload, sender, reply, stage_id)
        routes = self.remote.routes
        candidates: list[tuple[str | None, int]] = [(None, i) for i in local if self._reachable(i)]
        candidates += far
        if not candidates:  # route_again: the peer left while this server's replicas restart
            return False, f"no reachable replica of '{stage_id}'"
        delays = [self._delay_of(i) if s is None else routes.delay(s) for s, i in candidates]
        best = min(delays)
        turn = self._cluster_turn.get(stage_id, -1)
        count = len(candidates)
        for step in range(1, count + 1):
            k = (turn + step) % count
            if delays[k] <= best + SLOW_MARGIN:
                self._cluster_turn[stage_id] = k
                server, instance = candidates[k]
                if server is None:
                    return self.deliver(instance, msgid, payload, sender, reply)
                return self._send_far(server, instance, msgid, payload, sender, reply, stage_id)
        return False, f"no replica of '{stage_id}' available"  # unreachable: the best one passes

    def _send_far(
        self,
        server: str,
        instance: int,
        msgid: str,
        payload: bytes,
        sender: Sender,
        reply: str | None,
        reroute: str | None,
    ) -> Result:
        assert self.remote is not None
        return self.remote.send(server, ["m", instance, msgid, payload, self._named(sender), reply], reroute)

    def route_again(self, stage_id: str, frame: list[Any]) -> Result:
        """Route once more a message for ``stage_id`` whose server went away before it was sent."""
        _, _, msgid, payload, sender, reply = frame
        replicas = self._replicas.get(stage_id) or []
        far = self._remote_targets(stage_id, Scope.ANY, bool(replicas))
        if not replicas and not far:
            return False, f"no replica of '{stage_id}' left"
        known = self._own[sender] if type(sender) is int else Sender(*sender)
        return self._one_of(stage_id, replicas, far, msgid, payload, known, reply)

    def _to_server(self, sender: Sender, address: ToServer, payload: bytes, reply_to: str | None) -> Result:
        """``{id, addr [, ms]}``: ``id`` (``"stage:msg"``, or ``"msg"`` for the sender's stage id) there."""
        assert self.remote is not None
        addr = cluster_address(address.addr)
        server = self.remote.routes.addrs.get(addr)
        if server is None:
            return False, f"no server of the cluster at {addr}"
        try:
            inner = parse_target(address.msgid)
        except AddressError as err:
            return False, str(err)
        if type(inner) is LocalAsync:
            stage, msgid, tag, reply = sender.stage, inner.msgid, False, inner.reply
        elif type(inner) is ToStage and inner.scope is Scope.ANY:
            stage, msgid, tag, reply = inner.stage or sender.stage, inner.msgid, inner.tag_sender, inner.reply
        else:
            return False, f"{address.msgid!r} is not a message for a stage of that server"
        ms = address.timeout_ms
        deadline = None if ms is None else self.now() + ms / 1000.0
        frame = ["s", stage, msgid, tag, payload, self._named(sender), self._reply(sender, reply_to or reply), ms]
        return self.remote.send(server, frame, None, deadline)

    def _choose(self, stage_id: str, replicas: list[int]) -> int:
        """Round-robin over reachable replicas, skipping one whose process is clearly slower."""
        count = len(replicas)
        if count == 1:
            return replicas[0]
        live = [i for i in replicas if self._reachable(i)] or replicas
        best = min(self._delay_of(i) for i in live)
        fast = [i for i in live if self._delay_of(i) <= best + SLOW_MARGIN]
        turn = self._local_turn.get(stage_id, -1)
        # the next replica after the previous choice, in the server's fixed order
        for step in range(1, count + 1):
            candidate = replicas[(turn + step) % count]
            if candidate in fast:
                self._local_turn[stage_id] = (turn + step) % count
                return candidate
        return fast[0]

    def _reachable(self, instance: int) -> bool:
        group = self._placement[instance][1]
        return group == self.group or (self.links is not None and self.links.reachable(group))

    def _delay_of(self, instance: int) -> float:
        group = self._placement[instance][1]
        return self.delay if group == self.group else self.delays.get(group, 0.0)

    def _to_reply(self, sender: Sender, address: ReplyTo, payload: bytes, reply_to: str | None) -> Result:
        if address.server != self.server_id:
            if self.remote is None:
                return False, f"server '{address.server}' is not reachable (no cluster)"
            frame = [
                "m",
                address.instance,
                address.msgid,
                payload,
                self._named(sender),
                self._reply(sender, reply_to),
            ]
            return self.remote.send(address.server, frame)
        if not 0 <= address.instance < len(self._placement):
            return False, f"no stage instance {address.instance} on this server"
        return self.deliver(address.instance, address.msgid, payload, sender, self._reply(sender, reply_to))

    # -- delivery ---------------------------------------------------------------------------------
    def deliver(self, instance: int, msgid: str, payload: bytes, sender: Sender, reply: str | None) -> Result:
        """Queue a message for one stage instance of this server, here or in its process.

        The frame to another process is ``["m", instance, msgid, payload, sender, reply]``, its
        ``sender`` the instance number when the sender is one of this server's stages (the object
        ``sender_of`` gave it), else ``[server, group, stage, instance]``.
        """
        receiver = self.local.get(instance)
        if receiver is not None:
            self._enqueue(receiver, Message(msgid, payload, sender, reply, self.now()))
            return True, None
        if self.links is None:
            return False, f"stage instance {instance} is not in this process"
        group = self._placement[instance][1]
        return self.links.send(group, ["m", instance, msgid, payload, self._named(sender), reply])

    def deliver_run(self, instance: int, sender: Sender, count: int, body: bytes) -> Result:
        """Queue a run (``count`` messages packed in ``body``, see ``run_parts``) for one stage
        instance of this server, here or in its process, without scheduling a drain (the caller
        runs the queue once its network frame is queued, as ``frame_received``)."""
        if type(count) is not int or count < 1 or type(body) is not bytes:
            return False, "a malformed run (count and body)"
        receiver = self.local.get(instance)
        if receiver is None:
            if self.links is None or type(instance) is not int or not 0 <= instance < len(self._placement):
                return False, f"stage instance {instance} is not in this process"
            group = self._placement[instance][1]
            return self.links.send(group, ["r", instance, self._named(sender), count, body])
        queue = self._queue
        if queue:  # the run before it, from the same sender to the same stage: one run
            last_receiver, last = queue[-1]
            if (
                last_receiver is receiver
                and type(last) is Run
                and last.sender is sender
                and not last.started
                and last.size + len(body) <= RUN_JOIN_BYTES
            ):
                last.add(body, count)
                return True, None
        queue.append((receiver, Run(sender, body, count, self.now())))
        return True, None

    def _named(self, sender: Sender) -> int | list[Any]:
        """``sender`` as a frame to another process or server names it: its instance number when
        it is one of this server's stages (the object ``sender_of`` gave it; another server knows
        them from its hello), else in full."""
        own = self._own
        by = sender.instance
        return by if 0 <= by < len(own) and own[by] is sender else _sender_frame(sender)

    def _enqueue(self, receiver: Receiver, message: Message) -> None:
        self._queue.append((receiver, message))
        if self._drain_call is None:
            self._drain_call = self.clock.callLater(0, self._drain)

    def run_queue(self) -> None:
        """Run the queue now (from a network read, never from inside a handler)."""
        if self._queue and not self._draining:
            if self._drain_call is not None:
                self._drain_call.cancel()
            self._drain()

    def _drain(self) -> None:
        self._drain_call = None
        self._draining = True
        self._turns += 1
        self.turn = self._turns
        try:
            count = self._run_turn()
        finally:
            self._draining = False
            self.turn = None
        if self._queue:
            if self._drain_call is None:  # a handler's local message may have scheduled one already
                self._drain_call = self.clock.callLater(0, self._drain)
        elif count < 64:
            self.delay *= 0.5

    def _run_turn(self) -> int:
        """One drain turn: the queue's messages until it is empty or the slice is used up, in
        chunks; returns how many were handled."""
        queue = self._queue
        started = self.now()
        count = chunk = 0  # messages handled in this turn, and in its chunk
        check = SLICE_CHECK  # the count at which the turn's time is looked at next
        batching: set[Receiver] = set()  # stages to tell that this chunk ended
        limit = DRAIN_CHUNK  # this chunk's size: the smallest ``chunk`` of the stages in it
        while queue:
            receiver, message = queue.popleft()
            if receiver.batches:
                batching.add(receiver)
            if receiver.chunk < limit:
                limit = receiver.chunk
            room = max(limit - chunk, 1)
            if isinstance(message, Run):
                if receiver.runs:
                    try:
                        done = receiver.receive_run(message, room)
                    except Exception:
                        self.log.failure("stage {stage} failed on a run of messages", stage=receiver.stage_id)
                        done, message.count = 0, 0
                else:  # a chunk's worth of its messages, as queued messages are handed over
                    try:
                        batch = message.take(room)
                    except Exception:
                        self.log.failure("stage {stage} got a malformed run of messages", stage=receiver.stage_id)
                        batch, message.count = [], 0
                    done = self._hand(receiver, batch) if batch else 0
                if message.count > 0:  # the rest of the run stays at the head of the queue
                    queue.appendleft((receiver, message))
            else:
                # the messages after it to the same stage, up to the chunk's end, go in the same call
                batch = [message]
                if queue and queue[0][0] is receiver:
                    room -= 1
                    while room and queue and queue[0][0] is receiver and type(queue[0][1]) is Message:
                        batch.append(queue.popleft()[1])  # type: ignore[arg-type]
                        room -= 1
                done = self._hand(receiver, batch)
            count += done
            chunk += done
            if chunk >= limit:  # a run whose handlers sent nothing may go past it
                chunk = 0
                limit = DRAIN_CHUNK
                if queue:
                    self._end_chunk(batching)
                if count >= check:
                    check = count + SLICE_CHECK
                    now = self.now()
                    self.delay = 0.8 * self.delay + 0.2 * (now - message.enqueued)
                    if now - started > DRAIN_SLICE:
                        break
        self._end_chunk(batching)
        return count

    def _hand(self, receiver: Receiver, batch: list[Message]) -> int:
        """Hand ``batch`` (messages to one stage, in order) over in one call when the stage takes
        several at once, else one by one; returns how many were handed over."""
        if len(batch) > 1 and hasattr(receiver, "receive_batch"):
            try:
                receiver.receive_batch(batch)
            except Exception:
                self.log.failure(
                    "stage {stage} failed on message {msgid!r}", stage=receiver.stage_id, msgid=batch[0].msgid
                )
            return len(batch)
        for message in batch:
            try:
                receiver.receive(message)
            except Exception:
                self.log.failure(
                    "stage {stage} failed on message {msgid!r}", stage=receiver.stage_id, msgid=message.msgid
                )
        return len(batch)

    def _end_chunk(self, batching: set[Receiver]) -> None:
        """End the turn of the stages that batch, then send what this chunk's handlers sent."""
        for receiver in batching:
            try:
                receiver.turn_ended()
            except Exception:
                self.log.failure("stage {stage} failed at the end of a turn", stage=receiver.stage_id)
        batching.clear()
        if self.links is not None:
            self.links.flush()  # what the handlers sent leaves now, not one reactor turn later

    def queue_length(self) -> int:
        return len(self._queue)

    def refresh_delay(self) -> float:
        """This process's queue delay now (s), also when no message arrives to refresh ``delay``.

        ``delay`` is measured while the queue drains, so a burst's last reading would stay until
        the next message, and an overloaded server gets no message to refresh it (peers route
        nothing to it). An empty queue has no delay; a waiting one is at least as late as its
        oldest message.
        """
        if self._queue:
            self.delay = max(self.delay, self.now() - self._queue[0][1].enqueued)
        else:
            self.delay = 0.0
        return self.delay

    # -- frames from other processes --------------------------------------------------------------
    def frame_received(self, group: int, frame: list[Any]) -> None:
        """One frame from the process of ``group`` (see ``deliver`` and ``_lock`` for shapes).

        A message is queued without scheduling a drain: the link calls ``run_queue`` once its
        whole network frame is queued (a drain scheduled per frame would only be cancelled).
        """
        kind = frame[0]
        if kind == "m":
            _, instance, msgid, payload, sender, reply = frame
            receiver = self.local.get(instance)
            if receiver is None:
                self.log.warn("frame for stage instance {instance} that this process does not host", instance=instance)
                return
            known = self._known_sender(sender)
            if known is None:
                return
            self._queue.append((receiver, Message(msgid, payload, known, reply, self.now())))
        elif kind == "r":
            _, instance, sender, count, body = frame
            if instance not in self.local:
                self.log.warn("frame for stage instance {instance} that this process does not host", instance=instance)
                return
            known = self._known_sender(sender)
            if known is not None:
                ok, reason = self.deliver_run(instance, known, count, body)
                if not ok:
                    self.log.warn("frame from group {group} dropped: {reason}", group=group, reason=reason)
        elif kind == "delay":
            self.delays[group] = frame[1]
        elif kind == "lock" and self.locks is not None:
            self._apply_lock(frame[1])
        elif kind in CLUSTER_FRAMES and self.remote is not None:
            self.remote.process_frame(group, frame)
        else:
            self.log.warn("unknown frame kind {kind!r} from group {group}", kind=kind, group=group)

    def _known_sender(self, named: int | list[Any]) -> Sender | None:
        """The sender a frame from another process names (see ``deliver``); None, logged, for an
        instance number this server does not have."""
        if type(named) is int:
            if not 0 <= named < len(self._own):
                self.log.warn("frame from unknown stage instance {sender}", sender=named)
                return None
            return self._own[named]
        return self.named_sender(named)  # type: ignore[arg-type]

    def named_sender(self, named: list[Any]) -> Sender:
        """The ``Sender`` a frame names as ``[server, group, stage, instance]``, kept (at most
        ``SENDER_CACHE``) so a stream of messages from one sender makes one object, not one each."""
        key = tuple(named)
        known = self._senders.get(key)
        if known is None:
            known = self._senders.put(key, Sender(*key))
        return known

    # -- ordered locks ----------------------------------------------------------------------------
    def _lock(self, request: list[Any]) -> Result:
        if self.locks is not None:
            self._apply_lock(request)
            return True, None
        if self.links is None:
            return False, "the lock authority is not reachable"
        return self.links.send(LOCK_GROUP, ["lock", request])

    def _apply_lock(self, request: list[Any]) -> None:
        assert self.locks is not None
        op, cmd, who = request[0], request[1], request[2]
        if op == "acquire":
            self.locks.acquire(cmd, Turn(who, request[3], request[4]))
        elif op == "extend":
            self.locks.extend(cmd, who, request[3])
        elif op == "release":
            self.locks.release(cmd, who)

    def _grant(self, turn: Turn) -> None:
        instance = cast(int, turn.who)  # the router's lock turns are held by stage instances
        stage_id = self._placement[instance][0]
        lock_sender = Sender(self.server_id, LOCK_GROUP, stage_id, instance)
        ok, reason = self.deliver(instance, turn.reply, turn.payload, lock_sender, None)
        if not ok:
            self.log.warn("lock turn for instance {who} not delivered: {reason}", who=instance, reason=reason)


def _sender_frame(sender: Sender) -> list[Any]:
    return [sender.server, sender.group, sender.stage, sender.instance]
