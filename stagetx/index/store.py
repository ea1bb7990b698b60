"""Durability for the index stage: an append-only log of member states, snapshots, compaction.

Files in the index directory (``N`` = a 10-digit segment number):

- ``N.log``: frames, one per ``commit`` (a reactor turn of the stage), each a msgpack array of
  records. A record holds one changed member's *whole* new state ``[name, member, value,
  [score, seq] or nil per tier…]`` (trailing unscored tiers left out) or its deletion ``[name,
  member]``. Replaying a record twice gives the same state, which is what lets snapshots be
  taken while the stage keeps working. (A frame holding one bare record is read too: the format
  before records were batched.)
- ``N.snap``: every board as of some moment after ``N.log`` was started; a start loads the newest
  snapshot and replays ``N.log`` and later segments over it.
- ``N.snap.tmp``: a snapshot being written; it becomes ``N.snap`` by an atomic rename after fsync.
- ``LOCK``: held (flock) while a process uses the directory.

A frame is ``<u32 length><u32 crc32>`` then a msgpack payload. A torn or corrupt frame ends its
log segment: it is logged, ignored, and cut off the newest segment before new appends. A frame is
written whole before any reply of its turn leaves, so a torn frame holds only unacknowledged
changes.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import zlib
from collections.abc import Generator, Iterator
from typing import Any, BinaryIO

import msgpack
from twisted.logger import Logger

from stagetx.index.board import Board
from stagetx.index.commands import RequestError

_FRAME = struct.Struct("<II")
_NAME = re.compile(r"^(\d{10})\.(log|snap)$")
_HEADER = ["stagetx-index", 1]
_log = Logger(namespace="stagetx.index.store")


class StoreCorrupt(Exception):
    """A snapshot is damaged: it was fsynced and renamed, so this is disk corruption, not a crash."""


def frame(payload: bytes) -> bytes:
    """``payload`` with its length and CRC32 in front."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


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
        if zlib.crc32(payload) != crc:
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
#: about 3 µs per member and a log record is a little larger than a snapshot row, so each logged
#: change pays about 2 µs towards the next compaction at 2 (about 4 µs at 1).
COMPACT_RATIO = 2


class IndexStore:
    """The boards of one index stage and the files that make them durable.

    Implements ``commands.Boards``: the executor reports each changed member, the store frames its
    new state into a pending buffer, and ``commit`` writes the buffer with one ``write()`` before
    the stage replies. ``write()`` survives a kill of the process (the data sits in the OS page
    cache); with ``fsync=True`` each commit also survives a machine crash.
    """

    def __init__(
        self, directory: str, fsync: bool = False, compact_min_bytes: int = 4 << 20, chunk: int = 5000
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
        self._segment = 0
        self._fd = -1
        self._lock_fd = -1

    # -- Boards protocol -------------------------------------------------------------------

    def board(self, name: bytes, create: bool) -> Board | None:
        board = self.boards.get(name)
        if board is None and create:
            board = self.boards[name] = Board()
        return board

    def changed(self, name: bytes, board: Board, member: bytes) -> None:
        self._pending.append(board.record(name, member))

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
        """Write the pending records as one frame (one ``write()``); fsync too when configured."""
        if not self._pending:
            return
        data = frame(_pack(self._pending))
        self._pending.clear()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.log_bytes += len(data)
        if self.fsync:
            os.fdatasync(self._fd)
        else:
            self.dirty = True

    def discard_pending(self) -> None:
        """Drop records that could not be committed (the caller reports the failure)."""
        self._pending.clear()

    def sync(self) -> None:
        """fsync the log if anything was written since the last sync (the interval policy)."""
        if self.dirty and self._fd >= 0:
            self.dirty = False
            os.fdatasync(self._fd)

    # -- opening ---------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, load the newest snapshot, replay the logs, open the log for appends."""
        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = os.open(self._path("LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise RuntimeError(f"index directory {self.directory} is in use by another process") from None
        snaps, logs = self._scan()
        base = max(snaps, default=0)
        if base:
            self._load_snapshot(self._file(base, "snap"))
            self.snapshot_bytes = os.path.getsize(self._file(base, "snap"))
        self._remove_before(base)
        replay = [number for number in logs if number >= base]
        for number in replay:
            valid = self._replay(self._file(number, "log"))
            if number == replay[-1]:
                os.truncate(self._file(number, "log"), valid)
            self.log_bytes += valid
        self._segment = replay[-1] if replay else max(base, 1)
        self._fd = os.open(self._file(self._segment, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_dir(self.directory)

    def _scan(self) -> tuple[list[int], list[int]]:
        snaps: list[int] = []
        logs: list[int] = []
        for entry in os.listdir(self.directory):
            if entry.endswith(".tmp"):
                os.remove(self._path(entry))
                continue
            match = _NAME.match(entry)
            if match:
                (snaps if match.group(2) == "snap" else logs).append(int(match.group(1)))
        return sorted(snaps), sorted(logs)

    def _replay(self, path: str) -> int:
        with open(path, "rb") as file:
            data = file.read()
        payloads, valid = read_frames(data)
        if valid < len(data):
            _log.warn(
                "index log {path}: ignored {count} bytes of a torn or corrupt record at offset {offset}",
                path=path,
                count=len(data) - valid,
                offset=valid,
            )
        for payload in payloads:
            records = _unpack(payload)
            if records and type(records[0]) is list:
                for record in records:
                    self._apply(record)
            else:
                self._apply(records)  # a lone record: the format before records were batched
        return valid

    def _apply(self, record: list[Any]) -> None:
        name, member = record[0], record[1]
        board = self.boards.get(name)
        if board is None:
            board = self.boards[name] = Board()
        if len(record) == 2:
            board.delete(member)
        else:
            board.restore(member, record[2], record[3:])

    def _load_snapshot(self, path: str) -> None:
        with open(path, "rb") as file:
            records = _snapshot_records(file, path)
            if next(records, None) != _HEADER:
                raise StoreCorrupt(f"{path}: not an index snapshot")
            for record in records:
                if record[0] == "end":
                    return
                if record[0] != "board":
                    raise StoreCorrupt(f"{path}: unexpected record {record[0]!r}")
                board = self.boards[record[1]] = Board()
                board.next_seq = record[2]
                board.load(_snapshot_rows(records, path))
        raise StoreCorrupt(f"{path}: snapshot ends early")

    # -- compaction ------------------------------------------------------------------------

    def wants_compaction(self) -> bool:
        """True when the logs outgrew the live data (so files stay proportional to it)."""
        return not self.compacting and self.log_bytes > max(self.compact_min_bytes, COMPACT_RATIO * self.snapshot_bytes)

    def compaction(self) -> Generator[None, None, None]:
        """Rotate the log now; return the steps that write the snapshot, one chunk per step.

        The stage keeps serving between steps: the snapshot may include changes logged in the
        new segment, which replays idempotently over it. Closing the steps abandons the snapshot.
        """
        self.compacting = True
        return self._write_snapshot(self._rotate())

    def _write_snapshot(self, number: int) -> Generator[None, None, None]:
        temporary = self._path(f"{number:010d}.snap.tmp")
        done = False
        try:
            with open(temporary, "wb") as out:
                out.write(frame(_pack(_HEADER)))
                for name, board in list(self.boards.items()):
                    out.write(frame(_pack(["board", name, board.next_seq])))
                    members = list(board.values)
                    for start in range(0, len(members), self.chunk):
                        # a row is a log record without the board name: trailing unscored tiers left out
                        rows = [
                            board.record(name, member)[1:]
                            for member in members[start : start + self.chunk]
                            if member in board
                        ]
                        out.write(frame(_pack(["rows", rows])))
                        yield
                    out.write(frame(_pack(["end-board"])))
                out.write(frame(_pack(["end", len(self.boards)])))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self._file(number, "snap"))
            _fsync_dir(self.directory)
            done = True
            self._remove_before(number)
            self.snapshot_bytes = os.path.getsize(self._file(number, "snap"))
            self.log_bytes = sum(os.path.getsize(self._file(n, "log")) for n in self._scan()[1] if n >= number)
        finally:
            self.compacting = False
            if not done and os.path.exists(temporary):
                os.remove(temporary)

    def _rotate(self) -> int:
        self.sync()
        os.close(self._fd)
        self._segment += 1
        self._fd = os.open(self._file(self._segment, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fsync_dir(self.directory)
        return self._segment

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
        if self._fd >= 0:
            self.dirty = True
            self.sync()
            os.close(self._fd)
            self._fd = -1
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


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
