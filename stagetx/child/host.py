"""The stages of one child process: ``ProcessHost`` runs the stages of its ``#startup`` group and
their router.

``StageHost`` is what one stage sees of the process (the ``StageContext`` of
``stagetx.stages.base``) and what the router delivers to; ``ProcessServices`` is the state all
stages and sandboxes of the process share (``stage.once``/``stage.v``, config values, the title).
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import Any

import setproctitle
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from stagetx.address import Address, AddressError, ReplyTo, parse_target
from stagetx.bounded import BoundedDict
from stagetx.codec import pack_py
from stagetx.config import ServerConfig, StageConfig
from stagetx.message import CLUSTER_WAY, LATENCY_BUCKETS, Message, Run, run_entries, run_room
from stagetx.router import DRAIN_CHUNK, Result, Router, RunParts
from stagetx.shared import ProcessShared
from stagetx.stages.registry import stage_type

#: Errors (with file and line) each stage keeps for ``stat`` and the dashboard.
LAST_ERRORS = 10
#: Reply addresses a stage keeps parsed, and addresses whose run parts it keeps, at most this many.
REPLY_CACHE = 4096


class ProcessServices:
    """What every stage and worker sandbox of one process shares."""

    def __init__(
        self,
        config: ServerConfig,
        group: int,
        args: Sequence[str],
        server_id: str,
        services: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self.group = group
        self.slow_ms = 100.0  # a Lua callback longer than this is logged as a slow handler
        self.services = dict(services or {})  # "host:port" of #services -> inherited listening fd
        self.args = list(args)
        self.server_id = server_id
        self.shared = ProcessShared()
        self._lock = threading.Lock()
        self._values = {name: pack_py((value,)) for name, value in config.values.items()}
        self._written: dict[str, bytes | None] = {}

    def config_value(self, name: str, settings: Any) -> bytes | None:
        """``process["$NAME"]``: a value written at run time, else the stage's setting, else the config's."""
        with self._lock:
            if name in self._written:
                return self._written[name]
            if isinstance(settings, dict) and name in settings:
                return pack_py((settings[name],))
            return self._values.get(name)

    def set_config_value(self, name: str, payload: bytes | None) -> None:
        with self._lock:
            self._written[name] = payload

    def replace_config_values(self, values: dict[str, bytes]) -> None:
        """``process["$"] = json``: the new values replace the config's and earlier writes."""
        with self._lock:
            self._values = dict(values)
            self._written.clear()

    @staticmethod
    def title() -> str:
        return setproctitle.getproctitle()

    @staticmethod
    def set_title(title: str) -> None:
        setproctitle.setproctitle(title)


class StageHost:
    """One stage of this process: its context (for the stage) and its receiver (for the router)."""

    name: str

    def __init__(self, config: StageConfig, process: ProcessServices, router: Router, clock: IReactorTime) -> None:
        self.config = config
        self.name = config.name
        self.stage_id = config.id
        self.instance = config.instance
        self.settings = config.settings
        self.process = process
        self.router = router
        self.clock = clock
        self.base_dir = process.config.base_dir
        self.log = Logger(namespace=f"stage.{config.id}")
        self.sender = router.sender_of(config.instance)
        self.received = 0
        self.sent = 0
        self.errors = 0
        self.last_errors: deque[tuple[float, str]] = deque(maxlen=LAST_ERRORS)  # (wall time, error)
        self.busy = 0.0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # handler times, counted per bucket
        self._backlog: list[Message] | None = []  # messages that arrived before the stage started
        self._start_error: str | None = None  # a built-in stage's start that raised
        self.stage = stage_type(config.type).stage(self, config)
        self.batches = hasattr(self.stage, "turn_ended")
        self._receive_batch = getattr(self.stage, "receive_batch", None)
        self.runs = bool(getattr(self.stage, "runs", False))
        self.chunk = int(getattr(self.stage, "chunk", DRAIN_CHUNK))
        # parsed reply addresses, by their text
        self._reply_addresses: BoundedDict[str, Address] = BoundedDict(REPLY_CACHE)
        # by the address's text as written
        self._run_parts: BoundedDict[str | bytes, RunParts] = BoundedDict(REPLY_CACHE)

    # -- StageContext -----------------------------------------------------------------------------
    def resolve_path(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, path))

    def send(self, target: Any, *values: Any, reply_to: str | None = None) -> Result:
        return self.send_payload(parse_target(target), pack_py(values), reply_to)

    def reply(self, message: Message, *values: Any) -> None:
        """A reply address that does not parse is logged and skipped: the turn's other replies
        still go."""
        if message.reply is None:
            return
        address = self._reply_address(message)
        if address is not None:
            self.send_payload(address, pack_py(values))

    def reply_all(self, replies: Sequence[tuple[Message, Any]]) -> None:
        """``reply(message, value)`` for each pair, in order.

        Replies in a row to one reply address of a stage in another process or on another server
        are packed here into run entries (``stagetx.message.Run``), as a Lua stage's outbox packs
        its messages, rather than routed one by one: a chunk of requests from one sender is
        answered in one entry.
        """
        start, end = 0, len(replies)
        while start < end:
            reply = replies[start][0].reply
            stop = start + 1
            while stop < end and replies[stop][0].reply == reply:
                stop += 1
            address = None if reply is None else self._reply_address(replies[start][0])
            if address is not None:
                payloads = [pack_py((value,)) for _, value in replies[start:stop]]
                if len(payloads) == 1 or not self._reply_run(address, reply, payloads):  # type: ignore[arg-type]
                    for payload in payloads:
                        self.send_payload(address, payload)
            start = stop

    def _reply_run(self, address: Address, text: str, payloads: list[bytes]) -> bool:
        """Send ``payloads`` to ``address`` (whose text is ``text``) as run entries; False, having
        sent nothing, when it is not steady to another process or server (``Router.steady``) or
        a payload is too large for a run."""
        route = self.router.steady(self.sender, address)
        if route is None or route[1] == -1:
            return False
        head, msgid, nil, server, reroute = self.run_parts(text, address)
        if max(map(len, payloads)) > run_room(route[0], head, msgid, nil):
            return False
        for entry, count in run_entries(head, msgid, nil, payloads):
            ok, reason = self.send_run(route[1], entry, count, server, reroute)
            if not ok:
                self.log.warn("{count} replies to {reply!r} dropped: {reason}", count=count, reply=text, reason=reason)
        return True

    def run_parts(self, text: str | bytes, address: Address) -> RunParts:
        """``Router.run_parts`` of this stage to ``address`` (steady to another process or server),
        kept by the address's ``text`` as its sender wrote it: a stage sends to a few addresses
        many times (its Lua outbox by signal target, its answers by reply address)."""
        parts = self._run_parts.get(text)
        if parts is None:
            parts = self._run_parts.put(text, self.router.run_parts(self.sender, address))  # type: ignore[arg-type]
        return parts

    def _reply_address(self, message: Message) -> Address | None:
        """The parsed reply address of ``message`` (which has one); None, logged, when it does not
        parse. A stage answers a few senders many times: their addresses are kept parsed."""
        text: str = message.reply  # type: ignore[assignment]
        address = self._reply_addresses.get(text)
        if address is None:
            try:
                address = parse_target(text)
            except AddressError as error:
                self.log.warn("reply to {msgid!r} dropped: {error}", msgid=message.msgid, error=str(error))
                return None
            self._reply_addresses.put(text, address)
        return address

    def answer(self, message: Message, *values: Any) -> None:
        """Answer a request to a built-in index or curl stage: to its reply address when the
        sender named one (``"rank:q=got"``), else to the sender's handler named by the message id
        (``"rank:got"`` → ``waitfor("got")``), as the STAGE document's examples do."""
        if message.reply is not None:
            self.reply(message, *values)
        else:
            self.answer_sender(message, message.msgid, *values)

    def answer_sender(self, message: Message, msgid: str, *values: Any) -> None:
        """Send ``values`` to the handler ``msgid`` of the stage that sent ``message``.

        ``msgid`` is taken as the sender wrote it: the ``"<sender>:"`` tag of a ``"rank+got"``
        message and the ``=`` of ``"rank:=got"`` are dropped, so both reach ``waitfor("got")``.
        """
        sender = message.sender
        tag = sender.stage + ":"
        if msgid.startswith(tag) and len(msgid) > len(tag):
            msgid = msgid[len(tag) :]
        if msgid.startswith("=") and len(msgid) > 1:
            msgid = msgid[1:]
        self.send_payload(ReplyTo(sender.server, sender.instance, msgid), pack_py(values))

    def send_payload(self, address: Address, payload: bytes, reply_to: str | None = None) -> Result:
        self.sent += 1
        return self.router.send(self.sender, address, payload, reply_to)

    def send_run(
        self, way: int, entry: bytes, count: int, server: str | None = None, reroute: str | None = None
    ) -> Result:
        """``count`` messages of this stage, packed as one run entry (``Router.run_parts``): to the
        process of group ``way``, or to ``server`` when ``way`` is ``CLUSTER_WAY`` (``reroute``:
        the stage id they may go to instead if that server goes away)."""
        self.sent += count
        if way == CLUSTER_WAY:
            return self.router.send_far_run(server, entry, reroute)  # type: ignore[arg-type]
        return self.router.send_run(way, entry)

    def logger_for(self, group: str) -> Logger:
        return Logger(namespace=group)

    def count_error(self, error: str | None = None) -> None:
        self.errors += 1
        if error is not None:
            self.last_errors.append((time.time(), error))

    # -- Receiver ---------------------------------------------------------------------------------
    def receive(self, message: Message) -> None:
        if self._backlog is not None:
            self._backlog.append(message)
            return
        self.received += 1
        started = perf_counter()
        try:
            self.stage.receive(message)
        finally:
            elapsed = perf_counter() - started
            self.busy += elapsed
            self.latency[bisect_left(LATENCY_BUCKETS, elapsed)] += 1

    def receive_batch(self, messages: list[Message]) -> None:
        """A run of messages, in order: in one call to a stage that takes runs (a Lua stage
        crosses into Lua once for them and reports each message's handler time)."""
        if self._backlog is not None or self._receive_batch is None:
            for message in messages:
                self.receive(message)
            return
        self.received += len(messages)
        latency = self.latency
        for elapsed in self._receive_batch(messages):
            self.busy += elapsed
            latency[bisect_left(LATENCY_BUCKETS, elapsed)] += 1

    def receive_run(self, run: Run, limit: int) -> int:
        """Up to ``limit`` messages of a run (``Router``'s frame kind ``"r"``, for a stage whose
        ``runs`` is true): a Lua stage reads them in Lua and keeps their handler times itself
        (see ``take_times``)."""
        if self._backlog is not None:
            messages = run.take()
            for message in messages:
                self.receive(message)
            return len(messages)
        done: int = self.stage.receive_run(run, limit)
        self.received += done
        return done

    def take_times(self) -> None:
        """Count the handler times a stage kept itself into ``busy`` and ``latency``."""
        take = getattr(self.stage, "take_times", None)
        if take is None:
            return
        busy, counts = take()
        self.busy += busy
        latency = self.latency
        for i, n in enumerate(counts):
            latency[i] += n

    def turn_ended(self) -> None:
        self.stage.turn_ended()

    def replicas_lost(self, lost: frozenset[tuple[str, int]]) -> None:
        """Tell the stage (if it keeps state per replica) that replicas ``(server, instance)``
        went away with their process; never raises into the link's event."""
        forget = getattr(self.stage, "replicas_lost", None)
        if forget is None:
            return
        try:
            forget(lost)
        except Exception:
            self.log.failure("{stage}: forgetting the replicas of a lost process failed", stage=self.name)

    # -- life (driven by ProcessHost, one stage after another) --------------------------------------
    def start(self) -> Deferred[None]:
        """Start the stage; fires once it started (or failed to: the failure is kept and passed on)."""
        return maybeDeferred(self.stage.start).addBoth(self._started)

    @property
    def failure(self) -> str | None:
        """Why the stage is *failed* (its start, or a Lua stage's scripts), None while it serves."""
        return self._start_error or getattr(self.stage, "failure", None)

    def _started(self, result: Any) -> Any:
        """Hand over what arrived during start-up, in order (even after a failed start: it is logged)."""
        if isinstance(result, Failure):
            self._start_error = result.getErrorMessage() or result.type.__name__
        backlog, self._backlog = self._backlog or [], None
        for message in backlog:
            self.receive(message)
        return result

    def stop(self) -> Deferred[None]:
        return maybeDeferred(self.stage.stop)


class ProcessHost(Service):
    """The stages of ``#startup`` group ``group`` in this process, with their router.

    A plain ``Service``, not a ``MultiService``: the stages start one after another, each once the
    previous one's start has fired (``ready`` fires after the last), and stop in reverse order the
    same way, which ``MultiService`` (all children at once, results ignored) does not do.
    """

    log = Logger()

    def __init__(
        self,
        config: ServerConfig,
        group: int,
        clock: IReactorTime,
        server_id: str = "local",
        args: Sequence[str] = (),
        services: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.group = group
        placement = [(s.id, s.group) for s in config.stages]
        self.router = Router(server_id, group, placement, clock)
        self.process = ProcessServices(config, group, args, server_id, services)
        self.stages = [StageHost(s, self.process, self.router, clock) for s in config.startup[group]]
        self.ready: Deferred[None] = Deferred()  # fires once every stage has started (or failed to)
        for stage in self.stages:
            self.router.attach(stage)

    def startService(self) -> None:
        """Start the stages one after another, in config order; a failing stage is logged and skipped."""
        super().startService()

        def start(index: int) -> None:
            if index == len(self.stages):
                self.log.info(
                    "process {process} ready: {stages}",
                    process=self.group + 1,
                    stages=[s.name for s in self.stages],
                )
                if not self.ready.called:
                    self.ready.callback(None)
                return
            stage = self.stages[index]
            d = stage.start()
            d.addErrback(lambda f: self.log.failure("stage {name} failed to start", f, name=stage.name))
            d.addBoth(lambda _: start(index + 1))

        start(0)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d: Deferred[None] = Deferred()

        def stop(index: int) -> None:
            if index < 0:
                d.callback(None)
                return
            stage = self.stages[index]
            s = stage.stop()
            s.addErrback(lambda f: self.log.failure("stage {name} failed to stop", f, name=stage.name))
            s.addBoth(lambda _: stop(index - 1))

        stop(len(self.stages) - 1)
        return d
