"""Messages a worker sandbox signals reach the router on the reactor thread only, every one and in
order: a Lua stage in this process on the real reactor, with real worker threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from stagetx.router import Router
from tests.support import InProcessServer, LogCapture, wait_for, write_app
from tests.unit.test_lua_outbox import said

SANDBOX_MAIN = """
local got = {}
stage.waitfor("n", function(i)
    got[#got + 1] = i
    if #got == 100 then log4cxx.info("got", table.concat(got, ",")) end
end)
stage.submit(1, function()
    for i = 1, 100 do stage.signal("a:n", i) end
end)
"""


@pytest_twisted.ensureDeferred
async def test_a_sandbox_hands_every_message_to_the_reactor_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    send = Router.send

    def recorded(self: Router, *args: Any) -> Any:
        threads.add(threading.current_thread().name)
        return send(self, *args)

    monkeypatch.setattr(Router, "send", recorded)
    path = write_app(
        tmp_path,
        {"#startup": [["=lua+a"]], "=lua+a": {"%package": ["[0]lua"], "=lua+a": "main"}},
        {"main": SANDBOX_MAIN},
    )
    with LogCapture() as capture:
        server = InProcessServer(path)
        await server.start()
        try:
            await wait_for(lambda: said(capture, "got") != [], 20, "100 messages")
        finally:
            await server.stop()
    assert said(capture, "got") == [",".join(str(i) for i in range(1, 101))]
    assert threads == {threading.main_thread().name}
