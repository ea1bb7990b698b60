"""Messages a Lua stage signals to a stage of another process leave Lua in batches (the prelude's
outbox) once the router has said their route is steady for the turn; on real Lua and a real
router, with links that record frames. Every ``stage.signal`` still answers at the call, and the
frames leave in the order they were signalled whichever path each took. (A worker sandbox's
messages on the real reactor: tests/integration/test_lua_outbox.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stagetx.child.host import ProcessHost
from stagetx.codec import unpack_py
from stagetx.lua.api import StageAPI
from stagetx.wire import unpack_entries
from tests.fakes import ConnectedLinks
from tests.support import LogCapture, started_process

SCRIPT = """
stage.waitfor("go", function(n, big)
    local answers = {}
    for i = 1, n do
        local target = (i % 7 == 0 and "b:n=back") or (i % 11 == 0 and "*b:n") or "b:n"
        local ok, reason = stage.signal(target, i, i % 13 == 0 and big or nil)
        answers[#answers + 1] = tostring(ok) .. (reason and (" " .. reason) or "")
    end
    log4cxx.info("answers", table.concat(answers, ","))
    log4cxx.info("unknown", tostring(stage.signal("nobody:n", 1)))
    log4cxx.info("down", tostring(stage.signal("c:n", 1)))
    log4cxx.info("after", tostring(stage.signal("b:n", n + 1)))
end)
"""


def start(tmp_path: Path) -> tuple[ProcessHost, ConnectedLinks]:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "a.lua").write_text(SCRIPT)
    (tmp_path / "lua" / "b.lua").write_text("")
    config = {
        "#startup": [["=lua+a"], ["=lua+b"], ["=lua+c"]],
        "=lua": {"%package": ["[0]lua"], "=lua+a": "a", "=lua+b": "b", "=lua+c": "b"},
    }
    links = ConnectedLinks()
    return started_process(tmp_path, config, links), links


def go(host: ProcessHost, *values: Any) -> LogCapture:
    stage = host.stages[0]
    with LogCapture() as capture:
        stage.send("a:go", *values)
        host.router.run_queue()
    return capture


def said(capture: LogCapture, prefix: str) -> list[str]:
    rows = [line.split("\t") for line in capture.lines("stage.a")]
    return [row[1] for row in rows if row[0] == prefix]


def count_crossings(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the sending calls from Lua into Python, by kind (patched before a runtime binds them)."""
    counts = {"send_packed": 0, "send_batch": 0}
    for name in counts:
        original = getattr(StageAPI, name)

        def counted(self: StageAPI, *args: Any, _name: str = name, _original: Any = original) -> Any:
            counts[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(StageAPI, name, counted)
    return counts


def sent_to(links: ConnectedLinks, group: int) -> list[tuple[str, bytes, str | None]]:
    """``(msgid, payload, reply)`` of every message sent to ``group``, alone or in a run, in order."""
    sent = []
    for to, frame in links.frames:
        if to != group:
            continue
        if frame[0] == "r":
            fields = unpack_entries(frame[4])
            assert len(fields) == 3 * frame[3]
            sent += [tuple(fields[i : i + 3]) for i in range(0, len(fields), 3)]
        else:
            sent.append((frame[2], frame[3], frame[5]))
    return sent  # type: ignore[return-value]


def test_frames_leave_in_signal_order_whichever_path_each_took(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crossings = count_crossings(monkeypatch)
    host, links = start(tmp_path)
    capture = go(host, 200, "x" * 3000)
    to_b = [(msgid, unpack_py(payload)[0], reply) for msgid, payload, reply in sent_to(links, 1)]
    assert [n for _, n, _ in to_b] == list(range(1, 202))
    assert all((reply is not None) == (n % 7 == 0) for _, n, reply in to_b)
    assert said(capture, "answers") == [",".join(["true"] * 200)]
    assert said(capture, "unknown") == ["false"]
    assert said(capture, "after") == ["true"]
    # crossing at once: the first "b:n" and "b:n=back" (then steady), every broadcast "*b:n" and
    # the first "b:n" after each (its outbox flushed first), and the three sends after the loop;
    # the steady ones left in runs (at most 127 messages each): one between two broadcasts, and
    # around the first messages to each target and the sends after the loop
    broadcasts = len([i for i in range(1, 201) if i % 11 == 0 and i % 7 != 0])
    assert crossings["send_packed"] <= 2 + 2 * broadcasts + 3
    steady = 201 - (crossings["send_packed"] - 2)
    assert steady // 127 <= crossings["send_batch"] <= steady // 127 + broadcasts + 4


def test_a_process_not_linked_is_never_steady(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crossings = count_crossings(monkeypatch)
    host, links = start(tmp_path)
    links.down.add(1)
    go(host, 40)
    assert crossings["send_batch"] == 0
    assert crossings["send_packed"] == 40 + 3
    assert [unpack_py(payload)[0] for _, payload, _ in sent_to(links, 1)] == list(range(1, 42))


def test_payloads_past_the_room_cross_at_once_and_keep_their_place(tmp_path: Path) -> None:
    host, links = start(tmp_path)
    links.room = 1000
    go(host, 60, "y" * 2000)
    values = [unpack_py(payload) for _, payload, _ in sent_to(links, 1)]
    assert [v[0] for v in values] == list(range(1, 62))
    assert [len(v[1]) for v in values if len(v) > 1 and v[1] is not None] == [2000] * 4
