"""Durability for the index stage: an append-only log of member states, snapshots, compaction.

Files in the index directory (``N`` = a 10-digit segment number):

- ``N.log``: frames, one per ``commit`` (a reactor turn of the stage), each a msgpack array of
  records. A record holds one changed member's *whole* new state ``[name, member, value,
  [score, seq] or nil per tier…]`` (trailing unscored tiers left out) or its deletion ``[name,
  member]``. Replaying a record twice gives the same state, which is what lets snapshots be
  taken while the stage keeps working. (A frame holding one bare record is read too: the format
  before records were batched.)
- ``N.snap``: every board as of some moment after ``N.log`` was started; a start loads the newest
  snapshot and replays ``N.log`` and later segments over it. Format 3: a header frame, then per
  board a ``board`` record, ``columns`` chunks (``Board.columns``: members, values, and each
  tier's dense keys or scores and seqs) in tier-1 rank order, and ``end-board``; an ``end`` record
  last. Formats 1 (``rows`` records of whole member states) and 2 (scores and seqs for every
  tier) still load.
- ``N.snap.tmp``: a snapshot being written; it becomes ``N.snap`` by an atomic rename after fsync.
- ``LOCK``: held (flock) while a process uses the directory.

A frame is ``<u32 length><u32 crc32>`` then a msgpack payload. A torn or corrupt frame ends its
log segment: it is logged, ignored, and a torn one is cut off the newest segment before new
appends (a damaged frame with more after it is disk corruption: the segment is first copied to
``N.log.damaged``, so nothing after the damage is destroyed). A frame is
written whole before any reply of its turn leaves, so a torn frame holds only unacknowledged
changes; and nothing is ever appended after one: a failed or short write is cut off again at
once (``LogSegment.append``), and when even that fails the segment is sealed and the next
commit starts a new one. A commit that fails also undoes its changes in memory, so what a
failed write held is neither acknowledged nor visible (docs/reliability.md, "Crash consistency").
A commit first checks that its segment is still the file at its path (``LogSegment.in_place``,
at most every ``PLACE_CHECK_INTERVAL``):
when the directory was removed or renamed, writes would go where no start reads them, so the
store locks the directory anew at its path, starts a segment there and writes every board to it
by the next compaction (``IndexStore._rehome``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import re
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any, BinaryIO

import msgpack
from twisted.logger import Logger

from stagetx.stages.index.board import Board, saved_record
from stagetx.stages.index.commands import RequestError

_FRAME = struct.Struct("<II")
_NAME = re.compile(r"^(\d{10})\.(log|snap)$")
_MAGIC = "stagetx-index"
#: Snapshot format versions: 1 wrote row records in dict order; 2 column chunks in tier-1 rank
#: order, for a bulk load; 3 (written now) the same with a dense tier's keys stored whole
#: (``board.dump_keys``), so a load makes no key. All three load.
_VERSION = 3
_log = Logger(namespace="stagetx.stages.index.store")


class StoreCorrupt(Exception):
    """A snapshot is damaged: it was fsynced and renamed, so this is disk corruption, not a crash."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length and CRC32 in front."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def torn_tail(data: bytes, offset: int) -> bool:
    """True when ``data`` from ``offset`` is what an interrupted append leaves: the start of one
    frame cut short, or zeros (blocks a machine crash allocated but never wrote); False when an
    intact-length frame is damaged, which only disk corruption makes."""
    if len(data) - offset < _FRAME.size:
        return True
    length, _ = _FRAME.unpack_from(data, offset)
    return offset + _FRAME.size + length > len(data) or not data[offset:].strip(b"\0")


def read_frames(data: bytes) -> tuple[list[bytes], int]:
    """The intact payloads at the start of ``data`` and the length they cover."""
    payloads: list[bytes] = []
    offset = 0
    size = len(data)
    while offset + _FRAME.size <= size:
        length, crc = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if end > size:
            break
        payload = data[offset + _FRAME.size : end]
        if not length or zlib.crc32(payload) != crc:  # no frame is empty: zeros are not a frame
            break
        payloads.append(payload)
        offset = end
    return payloads, offset


_pack = msgpack.Packer(use_bin_type=True).pack  # reused: packb builds a Packer per call
_PLAIN = frozenset({bytes, float, bool, type(None)})  # always packable (a str may hold surrogates)
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)


#: The logs may grow to this many times the last snapshot before a compaction: a snapshot costs
#: about 0.4 µs of CPU per member (a dense board) and a score change's log record is about three
#: quarters of a snapshot row, so each logged change pays about 0.15 µs towards the next
#: compaction at 2 (about 0.3 µs at 1).
COMPACT_RATIO = 2

#: A snapshot being written is flushed to disk every this many bytes (as redis-server's
#: ``rdb-save-incremental-fsync`` does every 4 MB), so that no step of a compaction waits long for
#: the disk: its last step's ``fsync`` would otherwise write the whole file (hundreds of ms for ten
#: million members) while requests wait.
SNAPSHOT_SYNC_BYTES = 4 << 20
#: At most how often (s) a commit checks that its log is still at its path (``LogSegment.in_place``):
#: the stat costs as much as a small turn's write, and what is logged in between is in memory too,
#: which the compaction that follows a move writes to the new directory.
PLACE_CHECK_INTERVAL = 0.05


class LogSegment:
    """One log segment open for appends: the only code that writes log bytes.

    ``size`` is where its last whole frame ends. ``append`` either adds a whole frame or leaves
    the file as it was; when it cannot even cut a failed write off again (the disk refuses a
    truncate), the segment is ``torn`` and must not be appended to: the store seals it.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._clock = clock
        found = os.fstat(self.fd)
        self.size = found.st_size
        self._identity = (found.st_dev, found.st_ino)
        self._checked = clock()  # when ``path`` was last seen naming this file
        self._moved = False
        self.torn = False

    def in_place(self) -> bool:
        """True while ``path`` still names this file, looked at most every ``PLACE_CHECK_INTERVAL``
        (once moved, for good). A directory removed (``rm -r``) or renamed under the running
        stage leaves the open file writable, but no start would read it."""
        if self._moved:
            return False
        now = self._clock()
        if now - self._checked < PLACE_CHECK_INTERVAL:
            return True
        self._checked = now
        try:
            found = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            found = None
        self._moved = found is None or (found.st_dev, found.st_ino) != self._identity
        return not self._moved

    def write(self, data: bytes | memoryview) -> int:
        """One ``write()`` call; returns how many bytes it took (tests override it to inject faults)."""
        return os.write(self.fd, data)

    def append(self, data: bytes, sync: bool) -> None:
        """Write ``data`` whole at the end (and fdatasync it when ``sync``), or raise OSError with the
        segment cut back to its previous end."""
        try:
            written = self.write(data)  # all of it, unless the disk is full or a signal came
            if written < len(data):
                view = memoryview(data)
                while True:
                    if written <= 0:
                        raise OSError(errno.EIO, "write() wrote nothing")
                    view = view[written:]
                    if not view:
                        break
                    written = self.write(view)
            if sync:
                os.fdatasync(self.fd)
        except OSError:
            self.cut()
            raise
        self.size += len(data)

    def cut(self) -> None:
        """Truncate to the end of the last whole frame; on failure mark the segment torn."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            self.torn = True

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class IndexStore:
    """The boards of one index stage and the files that make them durable.

    Implements ``commands.Boards``: the executor reports each member about to change (the store
    keeps its old state until the commit) and each changed member (the store frames its new
    state into a pending buffer), and ``commit`` writes the buffer with one ``write()`` before
    the stage replies. ``write()`` survives a kill of the process (the data sits in the OS page
    cache); with ``fsync=True`` each commit also survives a machine crash.
    """

    #: Opens a log segment; tests substitute a subclass of ``LogSegment`` that injects faults.
    segment_type: type[LogSegment] = LogSegment

    def __init__(
        self, directory: str, fsync: bool = False, compact_min_bytes: int = 4 << 20, chunk: int = 2000
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.compact_min_bytes = compact_min_bytes
        self.chunk = chunk
        self.boards: dict[bytes, Board] = {}
        self.compacting = False
        self.log_bytes = 0
        self.snapshot_bytes = 0
        self.dirty = False
        self._pending: list[tuple[Any, ...]] = []
        # (name, member, Board.saved(member)) of each member changed since the commit: its old state
        self._undo: list[tuple[bytes, bytes, tuple[Any, ...]]] = []
        self._segment = 0
        self._unsnapshotted = 0  # a segment started by a compaction that failed (0: none)
        self._rehomed = False  # the directory was made anew: only a snapshot holds every board again
        self._log: LogSegment | None = None
        self._lock_fd = -1

    # -- Boards protocol -------------------------------------------------------------------

    def board(self, name: bytes, create: bool) -> Board | None:
        board = self.boards.get(name)
        if board is None and create:
            board = self.boards[name] = Board()
        return board

    def changing(self, name: bytes, board: Board, member: bytes) -> None:
        self._undo.append((name, member, board.saved(member)))

    def changed(self, name: bytes, board: Board, member: bytes) -> None:
        self._pending.append(board.record(name, member))

    def set_one(
        self, name: bytes, board: Board, member: bytes, number: int, score: Any, value: Any, has_value: bool
    ) -> int:
        rank, saved, record = board.set_logged(name, member, number, score, value, has_value)
        self._undo.append((name, member, saved))
        self._pending.append(record)
        return rank

    def check_value(self, value: Any) -> None:
        kind = type(value)
        if kind in _PLAIN or (kind is int and _INT_MIN <= value <= _UINT_MAX):
            return  # always packable: skip the trial pack
        try:
            _pack(value)
        except (TypeError, ValueError, OverflowError) as error:
            raise RequestError(f"value cannot be stored: {error}") from None

    # -- writing ---------------------------------------------------------------------------

    def commit(self) -> None:
        """Write the pending records as one frame (one ``write()``); fsync too when configured.

        Raises OSError when the frame could not be written whole: the log is left as it was
        before the frame and every change since the last commit is undone in memory.
        """
        if not self._pending:
            self._undo.clear()
            return
        try:
            data = frame(_pack(self._pending))
            self._pending.clear()
            log = self._log
            if log is None or log.torn or not log.in_place():
                log = self._writable()
            log.append(data, self.fsync)
        except BaseException:
            self._roll_back()
            raise
        self._undo.clear()
        self.log_bytes += len(data)
        if not self.fsync:
            self.dirty = True

    def _writable(self) -> LogSegment:
        """The segment to append to: a new one when the current one is torn (sealed for good), or
        in the directory made anew when the current one is no longer at its path."""
        assert self._log is not None, "the store is not open"
        if not self._log.in_place():
            return self._rehome()
        if self._log.torn:
            with contextlib.suppress(OSError):
                self._log.sync()  # its whole frames, for the interval fsync policy
            _log.warn("index log {path}: sealed after a write that could not be cut off", path=self._log.path)
            self._log = self._open_segment(self._segment + 1)
        return self._log

    def _rehome(self) -> LogSegment:
        """The log is no longer where a start reads it (its directory was removed or renamed):
        lock the directory anew at its path and start a segment there, numbered after any file it
        holds, so it replays last. Only the boards in memory hold everything now, so the next
        compaction is due at once (``wants_compaction``) and writes them all to it."""
        assert self._log is not None, "the store is not open"
        if self._lock_fd >= 0:  # first: a lock taken by a try that failed later would refuse this one
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
        self._lock()
        snaps, logs = self._numbers()
        gone = self._log.path
        log = self._open_segment(max([self._segment, *snaps, *logs]) + 1)
        # once per move (a failed try is the commit's error, which the stage logs at a bounded rate)
        _log.error(
            "index directory {directory}: the log {gone} is no longer there; started {path} and"
            " writing every index there again",
            directory=self.directory,
            gone=gone,
            path=log.path,
        )
        self._rehomed = True
        self._unsnapshotted = 0
        self.log_bytes = self.snapshot_bytes = 0
        return log

    def _roll_back(self) -> None:
        """Put back the old state of every member changed since the last commit, newest first."""
        undo, self._undo = self._undo, []
        self._pending.clear()
        for name, member, saved in reversed(undo):
            self._apply(saved_record(name, member, saved))

    def sync(self) -> None:
        """fsync the log if anything was written since the last sync (the interval policy)."""
        if self.dirty and self._log is not None:
            self.dirty = False
            self._log.sync()

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, load the newest snapshot, replay the logs, open the log for appends."""
        for _ in self.opening():
            pass

    def opening(self) -> Generator[None, None, None]:
        """``open`` in steps: the directory is locked now (RuntimeError when another process holds
        it), and each step of the returned generator loads about ``chunk`` members or log records,
        so a stage can serve its reactor between steps. The boards answer nothing before the last
        step: they are bulk-loaded, their maps filled by the snapshot and the replayed records and
        each tier sorted once at the end (``Board.finish_load``). Closing the steps abandons the
        load; ``close`` then releases the directory.
        """
        self._lock()
        return self._load()

    def _lock(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = os.open(self._path("LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise RuntimeError(f"index directory {self.directory} is in use by another process") from None

    def _load(self) -> Generator[None, None, None]:
        snaps, logs = self._scan()
        base = max(snaps, default=0)
        if base:
            yield from self._load_snapshot(self._file(base, "snap"))
            self.snapshot_bytes = os.path.getsize(self._file(base, "snap"))
        self._remove_before(base)
        replay = [number for number in logs if number >= base]
        for number in replay:
            valid = yield from self._replay(self._file(number, "log"))
            if number == replay[-1]:
                os.truncate(self._file(number, "log"), valid)
            self.log_bytes += valid
        for board in self.boards.values():
            board.finish_load()
            yield
        self._log = self._open_segment(replay[-1] if replay else max(base, 1))

    def _scan(self) -> tuple[list[int], list[int]]:
        """``_numbers``, after removing what interrupted snapshots left (``N.snap.tmp``)."""
        for entry in os.listdir(self.directory):
            if entry.endswith(".tmp"):
                os.remove(self._path(entry))
        return self._numbers()

    def _numbers(self) -> tuple[list[int], list[int]]:
        """The numbers of the snapshots and of the log segments in the directory, ascending."""
        snaps: list[int] = []
        logs: list[int] = []
        for entry in os.listdir(self.directory):
            match = _NAME.match(entry)
            if match:
                (snaps if match.group(2) == "snap" else logs).append(int(match.group(1)))
        return sorted(snaps), sorted(logs)

    def _replay(self, path: str) -> Generator[None, None, int]:
        """Replay one log segment, a step per ``chunk`` records or so; returns the length of its
        whole frames."""
        with open(path, "rb") as file:
            data = file.read()
        payloads, valid = read_frames(data)
        if valid < len(data) and torn_tail(data, valid):
            _log.warn(
                "index log {path}: ignored {count} bytes of a torn record at offset {offset}",
                path=path,
                count=len(data) - valid,
                offset=valid,
            )
        elif valid < len(data):
            # damage with more after it: keep every byte for the operator before anything is cut
            copy = path + ".damaged"
            if not os.path.exists(copy):
                shutil.copyfile(path, copy)
            _log.error(
                "index log {path}: damaged record at offset {offset}; the {count} bytes from there on"
                " are not replayed (the whole file is kept as {copy})",
                path=path,
                count=len(data) - valid,
                offset=valid,
                copy=copy,
            )
        applied = 0
        for payload in payloads:
            records = _unpack(payload)
            if records and type(records[0]) is list:
                for record in records:
                    self._apply(record)
                applied += len(records)
            else:
                self._apply(records)  # a lone record: the format before records were batched
                applied += 1
            if applied >= self.chunk:
                applied = 0
                yield
        return valid

    def _apply(self, record: list[Any] | tuple[Any, ...]) -> None:
        name, member = record[0], record[1]
        board = self.boards.get(name)
        if board is None:
            board = self.boards[name] = Board(loading=self._log is None)  # replay at open: bulk load
        if len(record) == 2:
            board.delete(member)
        else:
            board.restore(member, record[2], record[3:])

    def _load_snapshot(self, path: str) -> Generator[None, None, None]:
        with open(path, "rb") as file:
            records = _snapshot_records(file, path)
            header = next(records, None)
            if not isinstance(header, list) or len(header) != 2 or header[0] != _MAGIC:
                raise StoreCorrupt(f"{path}: not an index snapshot")
            if header[1] not in (1, 2, _VERSION):
                raise StoreCorrupt(f"{path}: snapshot format {header[1]!r} is newer than this version reads")
            for record in records:
                if record[0] == "end":
                    return
                if record[0] != "board":
                    raise StoreCorrupt(f"{path}: unexpected record {record[0]!r}")
                board = self.boards[record[1]] = Board(loading=True)
                board.next_seq = record[2]
                if header[1] == 1:
                    for member, value, states in _snapshot_rows(records, path):
                        board.restore(member, value, states)
                    yield
                    continue
                rows = 0
                for chunk in _snapshot_chunks(records, path):
                    try:
                        board.add_columns(chunk)
                    except (ValueError, TypeError, IndexError, pickle.UnpicklingError) as error:
                        raise StoreCorrupt(f"{path}: board {record[1]!r}: {error}") from None
                    rows += len(chunk[0])
                    yield
                if rows != len(board):
                    raise StoreCorrupt(f"{path}: board {record[1]!r} names a member twice")
        raise StoreCorrupt(f"{path}: snapshot ends early")

    # -- compaction ------------------------------------------------------------------------

    def wants_compaction(self) -> bool:
        """True when the logs outgrew the live data (so files stay proportional to it), or the
        directory was made anew and holds only what was logged since (``_rehome``)."""
        return not self.compacting and (
            self._rehomed or self.log_bytes > max(self.compact_min_bytes, COMPACT_RATIO * self.snapshot_bytes)
        )

    def compaction(self) -> Generator[None, None, None]:
        """Rotate the log now; return the steps that write the snapshot, one chunk per step.

        The stage keeps serving between steps: the snapshot may include changes logged in the
        new segment, which replays idempotently over it. Closing the steps abandons the snapshot.
        A step that fails (OSError, disk full) removes the partial snapshot: the files hold what
        they held before, plus the one new segment, which the next compaction snapshots onto
        again instead of starting another (replaying a segment over a snapshot taken after it
        began is what every start does already).
        """
        number = self._rotate()
        self.compacting = True
        self._unsnapshotted = number
        return self._write_snapshot(number)

    def _write_snapshot(self, number: int) -> Generator[None, None, None]:
        temporary = self._path(f"{number:010d}.snap.tmp")
        done = False
        try:
            with open(temporary, "wb") as out:
                out.write(frame(_pack([_MAGIC, _VERSION])))
                # every board's member order is copied before the first chunk: a board created
                # later is wholly in the new log segment
                boards = [(name, board, board.snapshot_chunks(self.chunk)) for name, board in self.boards.items()]
                unsynced = 0  # chunk bytes written since the last flush
                for name, board, chunks in boards:
                    out.write(frame(_pack(["board", name, board.next_seq])))
                    for chunk in chunks:
                        data = frame(_pack(["columns", *chunk]))
                        out.write(data)
                        unsynced += len(data)
                        if unsynced >= SNAPSHOT_SYNC_BYTES:
                            out.flush()
                            os.fdatasync(out.fileno())
                            unsynced = 0
                        yield
                    out.write(frame(_pack(["end-board"])))
                out.write(frame(_pack(["end", len(self.boards)])))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self._file(number, "snap"))
            _fsync_dir(self.directory)
            done = True
            self._unsnapshotted = 0
            self._rehomed = False
            self._remove_before(number)
            self.snapshot_bytes = os.path.getsize(self._file(number, "snap"))
            self.log_bytes = sum(os.path.getsize(self._file(n, "log")) for n in self._scan()[1] if n >= number)
        finally:
            self.compacting = False
            if not done:
                with contextlib.suppress(OSError):
                    os.remove(temporary)

    def _rotate(self) -> int:
        """Start a new segment for appends and return its number (the current one when it is still
        empty, or was started by a compaction that failed); the old segment stays open until the
        new one exists."""
        assert self._log is not None, "the store is not open"
        if not self._log.torn and (self._log.size == 0 or self._segment == self._unsnapshotted):
            return self._segment
        self.sync()
        self._log = self._open_segment(self._segment + 1)
        return self._segment

    def _open_segment(self, number: int) -> LogSegment:
        """Open segment ``number`` for appends, then close the previous one (if any)."""
        segment = self.segment_type(self._file(number, "log"))
        try:
            _fsync_dir(self.directory)
        except OSError:
            segment.close()
            raise
        previous, self._log, self._segment = self._log, segment, number
        if previous is not None:
            with contextlib.suppress(OSError):
                previous.close()
        return segment

    def _remove_before(self, number: int) -> None:
        snaps, logs = self._scan()
        for old in snaps:
            if old < number:
                os.remove(self._file(old, "snap"))
        for old in logs:
            if old < number:
                os.remove(self._file(old, "log"))

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """fsync and close the log, release the directory."""
        try:
            if self._log is not None:
                self.dirty = True
                try:
                    self.sync()
                finally:
                    self._log.close()
                    self._log = None
        finally:
            self.compacting = False
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _file(self, number: int, kind: str) -> str:
        return self._path(f"{number:010d}.{kind}")


def _snapshot_records(file: BinaryIO, path: str) -> Iterator[Any]:
    while True:
        head = file.read(_FRAME.size)
        if not head:
            return
        if len(head) < _FRAME.size:
            raise StoreCorrupt(f"{path}: truncated frame")
        length, crc = _FRAME.unpack(head)
        payload = file.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            raise StoreCorrupt(f"{path}: damaged frame at offset {file.tell() - len(payload) - _FRAME.size}")
        yield _unpack(payload)


def _snapshot_rows(records: Iterator[Any], path: str) -> Iterator[tuple[bytes, Any, list[Any]]]:
    for record in records:
        if record[0] == "end-board":
            return
        if record[0] != "rows":
            raise StoreCorrupt(f"{path}: unexpected record {record[0]!r}")
        for row in record[1]:
            yield row[0], row[1], row[2:]
    raise StoreCorrupt(f"{path}: snapshot ends inside a board")


def _snapshot_chunks(records: Iterator[Any], path: str) -> Iterator[list[Any]]:
    for record in records:
        if record[0] == "end-board":
            return
        if record[0] != "columns" or len(record) < 3:
            raise StoreCorrupt(f"{path}: unexpected record {record[0]!r}")
        yield record[1:]
    raise StoreCorrupt(f"{path}: snapshot ends inside a board")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
