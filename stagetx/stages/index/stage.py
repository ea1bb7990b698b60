"""The built-in ``=index`` stage: a durable real-time scoreboard (docs/index.md).

The thin edge around ``stagetx.stages.index``: settings, start/stop, one message → one request table →
one reply, with the turn's log write made before its replies, the fsync policy, and background
compaction. Storage failures (a full disk) are counted as stage errors, logged at a bounded
rate, and a failed compaction is retried after a back-off. The start loads the indexes in steps
between reactor turns; requests that arrive meanwhile wait in a bounded queue and run once the
load is complete. A directory that cannot be locked leaves the stage failed (requests answered
with the reason) while it tries again every ``LOCK_RETRY`` seconds.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import time
from collections.abc import Callable, Generator
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall

from stagetx.address import AddressError, parse_target
from stagetx.codec import unpack_py
from stagetx.message import Message
from stagetx.ratelog import RateLimitedLog
from stagetx.stages.base import StageContext
from stagetx.stages.checks import MAX_MS, milliseconds, unreadable, unusable_directory
from stagetx.stages.index.commands import Executor, IndexMessage, RequestError, read_message
from stagetx.stages.index.redis_link import RedisSettings, parse_redis_settings
from stagetx.stages.index.store import IndexStore
from stagetx.stages.registry import SettingsError

DEFAULT_KEY_SIZE = 255
#: Seconds between looks at how much the indexes grew since the heap was last frozen.
FREEZE_CHECK = 1.0
#: Members added since the last ``gc.freeze()`` that make the next check freeze again: at least
#: this many, and at least a tenth of the members frozen before (so freezes stay rare).
FREEZE_GROWTH = 50_000
#: Seconds before a failed compaction is tried again: doubled after each failure up to the most.
COMPACT_RETRY_FIRST = 1.0
COMPACT_RETRY_MOST = 60.0
#: Seconds of load steps run back to back before the reactor gets a turn.
LOAD_SLICE = 0.01
#: Requests held while the indexes load; past it a request is answered ``{error = …}`` at once.
LOAD_QUEUE = 10_000
#: Queued requests run per log write once the load is complete (as the router's drain chunks).
LOAD_DRAIN_CHUNK = 64
#: Seconds between tries to lock a directory another process holds or that cannot be opened: the
#: process of a server that is still stopping may hold it for a moment, a disk may come back.
LOCK_RETRY = 1.0


@attrs.frozen
class IndexSettings:
    """The stage's config value, in any of its accepted shapes (see ``parse_settings``)."""

    directory: str
    key_size: int = DEFAULT_KEY_SIZE
    fsync: bool | float = False  # False: write() only; True: fsync every reply; float: seconds


def parse_settings(raw: Any, resolve: Callable[[str], str]) -> IndexSettings | RedisSettings:
    """``"dir"``, ``["dir", key_size, page_items]`` or ``{"dir", "key_size", "fsync"}``; or
    ``{"redis": URL, …}`` for boards on Redis (``stagetx.stages.index.redis_link``).

    ``page_items`` is accepted and ignored. ``fsync`` is ``false`` (default), ``true``, or a
    number of milliseconds between fsyncs. Raises ValueError with a readable message.
    """
    if isinstance(raw, dict) and "redis" in raw:
        key_size = raw.get("key_size", DEFAULT_KEY_SIZE)
        if type(key_size) is not int or key_size < 1:
            raise ValueError("=index: key_size must be a positive integer")
        try:
            return parse_redis_settings(raw, key_size, resolve)
        except ValueError as error:
            raise ValueError(f"=index: {error}") from None
    if isinstance(raw, str):
        raw = {"dir": raw}
    elif isinstance(raw, list) and 1 <= len(raw) <= 3:
        raw = dict(zip(("dir", "key_size", "page_items"), raw))
    if not isinstance(raw, dict) or not isinstance(raw.get("dir"), str) or not raw["dir"]:
        raise ValueError('=index: expected a directory, [dir, key_size, page_items] or {"dir": …}')
    unknown = set(raw) - {"dir", "key_size", "page_items", "fsync"}
    if unknown:
        raise ValueError(f"=index: unknown settings {sorted(unknown)}")
    key_size = raw.get("key_size", DEFAULT_KEY_SIZE)
    if type(key_size) is not int or key_size < 1:
        raise ValueError("=index: key_size must be a positive integer")
    fsync = raw.get("fsync", False)
    if type(fsync) is not bool:
        if not milliseconds(fsync):
            raise ValueError(f"=index: fsync: expected true, false or milliseconds (above 0, at most {MAX_MS})")
        fsync = fsync / 1000.0
    return IndexSettings(resolve(raw["dir"]), key_size, fsync)


def check_settings(settings: Any, path: str, base_dir: str) -> None:
    """The registry's check (``stagetx.stages.registry``): the error names the key, e.g.
    ``=index+rank.redis: …``, or the stage when the value's shape is wrong. The directory must be
    one (or creatable) and a Redis ``ca`` file readable, else the stage would fail at each start."""
    try:
        parsed = parse_settings(settings, lambda name: os.path.join(base_dir, name))
    except ValueError as error:
        text = str(error).removeprefix("=index: ")
        key, colon, problem = text.partition(": ")
        if colon and isinstance(settings, dict) and key in settings:
            raise SettingsError(f"{path}.{key}: {problem}") from None
        raise SettingsError(f"{path}: {text}") from None
    if isinstance(parsed, IndexSettings):
        unusable = unusable_directory(parsed.directory)
        where = f"{path}.dir" if isinstance(settings, dict) else path
    else:
        unusable = unreadable(parsed.ca) if parsed.ca is not None else None
        where = f"{path}.ca"
    if unusable is not None:
        raise SettingsError(f"{where}: {unusable}")


def held_paths(settings: Any, base_dir: str) -> tuple[str, ...]:
    """The registry's ``holds``: an embedded index's directory, which one process at a time uses
    (its ``LOCK``); nothing for boards on Redis."""
    parsed = parse_settings(settings, lambda name: os.path.join(base_dir, name))
    return (os.path.realpath(parsed.directory),) if isinstance(parsed, IndexSettings) else ()


class Stage:
    """An index stage: ``"=index+rank": "score/"``.

    With ``{"redis": URL, …}`` settings, constructing a ``Stage`` gives a ``RedisStage`` instead
    (``stagetx.stages.index.redis_stage``): the host makes every stage type by calling ``Stage``.
    """

    #: Requests per chunk of a drain turn, half the router's ``DRAIN_CHUNK``: each costs several
    #: µs, so a requester with many in flight gets its first answers sooner and works on them
    #: while this stage runs the next ones (end to end with 50 in flight: 90–94 → 95–101 k sets/s).
    chunk = 16

    def __new__(cls, context: StageContext, config: Any) -> Any:
        settings = parse_settings(getattr(config, "settings", config), context.resolve_path)
        if isinstance(settings, RedisSettings):
            from stagetx.stages.index.redis_stage import RedisStage

            return RedisStage(context, settings)
        return super().__new__(cls)

    def __init__(self, context: StageContext, config: Any) -> None:
        self.context = context
        settings = parse_settings(getattr(config, "settings", config), context.resolve_path)
        assert isinstance(settings, IndexSettings)
        self.settings = settings
        self.store = IndexStore(self.settings.directory, fsync=self.settings.fsync is True)
        self.executor = Executor(self.store, self.settings.key_size)
        self._syncer: LoopingCall | None = None
        self._compaction: Generator[None, None, None] | None = None
        self._step: IDelayedCall | None = None
        self._replies: list[tuple[Message, IndexMessage, dict[Any, Any]]] = []  # sent by ``turn_ended``
        self._freezer: LoopingCall | None = None
        self._frozen_members = 0  # members alive at the last gc.freeze()
        self._storage_log = RateLimitedLog(context.log, context.clock)
        self._compact_retry = 0.0  # the back-off after a failed compaction (0: none failed)
        self._compact_after = 0.0  # no compaction before this time (clock seconds)
        self._loading: Generator[None, None, None] | None = None  # the load's remaining steps
        self._load_step: IDelayedCall | None = None
        self._waiting: list[Message] | None = None  # requests that arrived during the load
        self._load_started = 0.0
        #: Why the stage cannot serve (its load failed), for the host's stat and health; else None.
        self.failure: str | None = None
        self._stopped = False  # a request that still arrives is answered with an error

    @property
    def loaded(self) -> bool:
        """True once the indexes are loaded and requests run as they arrive."""
        return self._waiting is None and self.failure is None and self._loading is None and not self._stopped

    def start(self) -> None:
        """Lock the directory, then load the indexes in steps between reactor turns; ``_loaded``
        serves what waited."""
        self._lock()

    def _lock(self) -> None:
        """Lock the directory and start the load; while another process holds the directory (or it
        cannot be opened) the stage is failed with the reason, counted and logged once, and tries
        again every ``LOCK_RETRY`` seconds: a start that gave up would leave it failed for good."""
        self._load_step = None
        try:
            self._loading = self.store.opening()
        except (RuntimeError, OSError) as error:
            failure = f"index directory unavailable: {error}"
            if failure != self.failure:
                self.failure = failure
                self.context.count_error(failure)
                self.context.log.error(
                    "index {stage}: {failure}; trying again every {delay} s",
                    stage=self.context.name,
                    failure=failure,
                    delay=LOCK_RETRY,
                )
            self._load_step = self.context.clock.callLater(LOCK_RETRY, self._lock)
            return
        if self.failure is not None:
            self.failure = None
            self.context.log.info("index {stage}: directory locked", stage=self.context.name)
        self._waiting = []
        self._load_started = self.context.clock.seconds()
        self._load_step = self.context.clock.callLater(0, self._load_next)

    def _load_next(self) -> None:
        """Steps of the load for ``LOAD_SLICE`` seconds (at least one), then let the reactor queue
        what arrives before the next ones."""
        self._load_step = None
        assert self._loading is not None
        until = time.perf_counter() + LOAD_SLICE
        try:
            next(self._loading)
            while time.perf_counter() < until:
                next(self._loading)
        except StopIteration:
            self._loading = None
            self._loaded()
            return
        except Exception as error:
            self._loading = None
            self._load_failed(error)
            return
        self._load_step = self.context.clock.callLater(0, self._load_next)

    def _load_failed(self, error: Exception) -> None:
        """A snapshot that cannot be read (disk corruption) or a failing disk: the stage stays
        failed (stat, health) and every request is answered with the reason."""
        self.failure = f"index load failed: {error}"
        self.context.count_error(self.failure)
        self.context.log.error("index {stage}: {failure}", stage=self.context.name, failure=self.failure)
        self.store.close()
        self._serve_waiting()

    def _loaded(self) -> None:
        """Freeze the loaded indexes out of the cyclic GC's sight (see docs/index.md), start the
        timers, then run the requests that waited, in their order. Only the young generations are
        collected first, as ``_refreeze`` does: a full pass would walk every object of the process
        (a twentieth of a 1M-member start) to free the few cycles the load could have made."""
        gc.collect(1)
        gc.freeze()
        return_free_memory()
        self._frozen_members = self._members()
        self.context.log.info(
            "index {stage}: {boards} indexes, {members} members loaded from {directory} in {seconds:.2f} s"
            " ({waiting} requests waited)",
            stage=self.context.name,
            boards=len(self.store.boards),
            members=self._frozen_members,
            directory=self.settings.directory,
            seconds=self.context.clock.seconds() - self._load_started,
            waiting=len(self._waiting or ()),
        )
        if type(self.settings.fsync) is float:
            self._syncer = LoopingCall(self._sync)
            self._syncer.clock = self.context.clock
            self._syncer.start(self.settings.fsync, now=False)
        self._freezer = LoopingCall(self._refreeze)
        self._freezer.clock = self.context.clock
        self._freezer.start(FREEZE_CHECK, now=False)
        self._serve_waiting()
        self._maybe_compact()

    def _serve_waiting(self) -> None:
        """Run the requests that waited for the load, ``LOAD_DRAIN_CHUNK`` per log write (or answer
        them with the failure); later ones are run as they arrive."""
        waiting, self._waiting = self._waiting or [], None
        for start in range(0, len(waiting), LOAD_DRAIN_CHUNK):
            for message in waiting[start : start + LOAD_DRAIN_CHUNK]:
                self.receive(message)
            self.turn_ended()

    def stop(self) -> None:
        """Answer this turn's requests, abandon a running compaction or load, fsync and close the log.

        Requests still waiting for an abandoned load are answered with an error: none is dropped.
        """
        if self._load_step is not None and self._load_step.active():
            self._load_step.cancel()
        if self._loading is not None:
            self._loading.close()
            self._loading = None
            self.failure = "index stopped before its load was complete"
            self._serve_waiting()
        self.turn_ended()
        for loop in (self._syncer, self._freezer):
            if loop is not None and loop.running:
                loop.stop()
        if self._step is not None and self._step.active():
            self._step.cancel()
        if self._compaction is not None:
            self._compaction.close()
            self._compaction = None
        self._storage_log.stop()
        self.store.close()
        self._stopped = True

    def receive(self, message: Message) -> None:
        """Run one request now; its answer waits for this turn's log write (``turn_ended``).

        While the indexes load, the request waits (up to ``LOAD_QUEUE`` of them; past that it is
        answered with an error); after a failed load it is answered with the failure.
        """
        if self._waiting is not None and len(self._waiting) < LOAD_QUEUE:
            self._waiting.append(message)
            return
        form = message_form(message.msgid, message.reply)
        if self._waiting is not None or self.failure is not None or self._stopped:
            if self._stopped:
                reason = "index stopped"
            else:
                reason = self.failure or f"index loading: {LOAD_QUEUE} requests are waiting already; try again"
            self._replies.append((message, form, {"error": reason}))
            return
        try:
            # unpack_py(payload) is what message.values returns; called directly, it skips the
            # property's per-call import (about 1 µs of a ~15 µs request)
            values = unpack_py(message.payload)
            argument = values[0] if values else None
            reply = self.executor.run(argument if form.command is None else form.request(argument))
        except RequestError as error:
            reply = {"error": str(error)}
        except Exception:
            self.context.log.failure("index {stage}: request failed", stage=self.context.name)
            reply = {"error": "internal error in the index stage"}
        self._replies.append((message, form, reply))

    def turn_ended(self) -> None:
        """End of a turn: one log ``write()`` for every change of the turn, then every reply.

        The router hands a stage queued messages in chunks of up to ``DRAIN_CHUNK`` and calls this
        after each chunk, so under load one write and one frame serve a chunk of requests. No
        reply leaves before the write that holds its changes has returned.
        """
        replies, self._replies = self._replies, []
        try:
            self.store.commit()
        except Exception as error:  # OSError mostly (disk full); the replies must go out either way
            # the store undid the turn's changes: every request of the turn gets the error
            self.context.count_error(f"log write failed: {error}")
            self._storage_log.error("index {stage}: log write failed: {error}", stage=self.context.name, error=error)
            failed = {"error": f"index storage failed: {error}"}
            replies = [(message, form, {key: failed for key in reply}) for message, form, reply in replies]
        send_answers(self.context, replies)
        self._maybe_compact()

    def _members(self) -> int:
        return sum(len(board) for board in self.store.boards.values())

    def _refreeze(self) -> None:
        """Freeze the heap again once the indexes grew well past what the last freeze covered.

        A full cyclic-GC pass walks every live container; members set since the start would make
        it grow with the index (tens of ms per million members). Collecting the young
        generations first keeps their reference cycles out of the permanent generation, where
        they would never be freed; ``gc.freeze()`` itself only moves lists.
        """
        members = self._members()
        if members - self._frozen_members >= max(FREEZE_GROWTH, self._frozen_members // 10):
            gc.collect(1)
            gc.freeze()
            self._frozen_members = members

    def _sync(self) -> None:
        try:
            self.store.sync()
        except OSError as error:
            self.context.count_error(f"fsync failed: {error}")
            self._storage_log.error("index {stage}: fsync failed: {error}", stage=self.context.name, error=error)

    def _maybe_compact(self) -> None:
        # the store's check first: it is the one that fails at the end of nearly every turn
        if not self.store.wants_compaction() or self._compaction is not None or not self.loaded:
            return
        if self.context.clock.seconds() < self._compact_after:
            return
        try:
            self._compaction = self.store.compaction()
        except OSError as error:
            self._compaction_failed(error)
            return
        self._step = self.context.clock.callLater(0, self._compact_step)

    def _compaction_failed(self, error: Exception) -> None:
        """Count and log the failure once, and leave the files alone until the back-off has passed."""
        self._compaction = None
        self._compact_retry = min(max(2 * self._compact_retry, COMPACT_RETRY_FIRST), COMPACT_RETRY_MOST)
        self._compact_after = self.context.clock.seconds() + self._compact_retry
        self.context.count_error(f"compaction failed: {error}")
        self.context.log.error(
            "index {stage}: compaction failed ({error}); next try in {delay} s",
            stage=self.context.name,
            error=error,
            delay=self._compact_retry,
        )

    def _compact_step(self) -> None:
        """Write one chunk of the snapshot, then let the reactor serve before the next one."""
        self._step = None
        assert self._compaction is not None
        try:
            next(self._compaction)
        except StopIteration:
            self._compaction = None
            self._compact_retry = 0.0
            self.context.log.info(
                "index {stage}: compacted, snapshot {size} bytes",
                stage=self.context.name,
                size=self.store.snapshot_bytes,
            )
            return
        except OSError as error:
            self._compaction_failed(error)
            return
        except Exception:
            self._compaction = None
            self.context.count_error()
            self.context.log.failure("index {stage}: compaction failed", stage=self.context.name)
            return
        self._step = self.context.clock.callLater(0, self._compact_step)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, None where the C library has none."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). A load frees the lists of its decoded chunks (about 16 bytes per member) into the
    heap, where they would stay resident; the call takes a few ms at a million members."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def send_answers(context: StageContext, replies: list[tuple[Message, IndexMessage, Any]]) -> None:
    """Answer each message with its reply table as its form says (``send_answer``), in order:
    the tables to reply addresses (most requests) in one ``reply_all`` per stretch of them."""
    tables: list[tuple[Message, Any]] = []
    for message, form, reply in replies:
        if form.command is None and form.callback is None:
            tables.append((message, reply))
        else:
            if tables:
                context.reply_all(tables)
                tables = []
            send_answer(context, message, form, form.answer(reply))
    if tables:
        context.reply_all(tables)


def send_answer(context: StageContext, message: Message, form: IndexMessage, answer: Any) -> None:
    """Answer ``message`` as ``form`` says: the sender's handler, else the reply address (if any)."""
    if form.callback is not None:
        context.answer_sender(message, form.callback, answer)
    else:
        context.reply(message, answer)


@functools.lru_cache(maxsize=4096)
def message_form(msgid: str, reply: str | None) -> IndexMessage:
    """``read_message`` of a message id and its whole reply address, cached: a sender uses a few
    of each, and parsing the reply address was a tenth of a set's CPU in the stage."""
    return read_message(msgid, reply_msgid(reply))


def reply_msgid(reply: str | None) -> str | None:
    """The message id of a reply address (``"^server/3/got"`` → ``"got"``), None without one, and
    ``""`` for one that does not parse (``StageHost.reply`` logs it)."""
    if reply is None:
        return None
    try:
        address = parse_target(reply)
    except AddressError:
        return ""
    return getattr(address, "msgid", "")
