"""The dashboard in a real browser: headless Chromium (DevTools protocol over a pipe) opens the
admin page of a real server, waits for live data, compares it with the console's ``stat``, clicks
through the scoreboard browser and saves a screenshot (``$STAGETX_ARTIFACTS`` or the test's tmp dir).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerProcess

GAME = """
stage.waitfor("ranked", function(r) end)
stage.addtask(100, function()
  local set = {}
  for i = 1, 40 do set["player" .. i] = {v = "P" .. i, I = {i * 10, 1000 - i}} end
  stage.signal("rank:q=ranked", {["set:arena"] = set})
  for _ = 1, 5 do stage.signal("rank:q=ranked", {["total:arena"] = true}) end
end)
"""


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed)."""

    def __init__(self, browser: str, profile: Path, extra_args: tuple[str, ...] = ()) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends become fds 3 and 4 (moved high first: no clash)
            read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--window-size=1400,1300",
                *extra_args,
                "about:blank",
            ],
            preexec_fn=fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._ids = 0
        self._buffer = b""
        self.session: str | None = None

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 20.0) -> Any:
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._ids:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise AssertionError(f"the browser did not answer {method} within {timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise AssertionError("the browser went away")
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.1)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


def console_stat(port: int) -> dict[str, int]:
    """``stat`` on the admin line console: ``{stage name: messages in}``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"stat\n")
        text = b""
        while not re.search(rb"^(OK|ERROR.*)$", text, re.M):
            chunk = conn.recv(65536)
            assert chunk, text
            text += chunk
    rows = [line.split() for line in text.decode().splitlines()[1:-1]]
    return {row[1]: int(row[2]) for row in rows if row[0].isdigit()}  # not the indented detail lines


def cell(stage: str, field: str) -> str:
    return f"document.querySelector('#stages tr[data-stage=\"{stage}\"] [data-field={field}]')?.textContent"


@pytest.mark.timeout(120)
def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (install the Debian package chromium; .ci/run does)")
    (tmp_path / "game.lua").write_text(GAME)
    config = {
        "#startup": [["=index+rank", "=ticket+ticket", "=route+route"], ["=lua+game"]],
        "#admin": {"http": "tcp:0:interface=127.0.0.1", "console": "tcp:0:interface=127.0.0.1"},
        "=index+rank": "scores",
        "=ticket+ticket": [10, {"login": 2}, 5000],
        "=route+route": {},
        "=lua+game": {"=lua+game": "game", "%package": ["[0]."]},
    }
    (tmp_path / "stage.json").write_text(json.dumps(config))
    artifacts = Path(os.environ.get("STAGETX_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    with ServerProcess(tmp_path / "stage.json") as server:
        server.wait_for(lambda: any("] ready: " in line for line in server.lines), what="the server to be ready")
        ports = dict(re.findall(r"admin (\w+) listening on [\d.]+:(\d+)", "\n".join(server.lines)))
        devtools = DevTools(browser, tmp_path / "profile")
        try:
            devtools.open(f"http://127.0.0.1:{ports['http']}/")
            devtools.wait("document.getElementById('connection')?.textContent === 'live'", what="the live stream")
            devtools.wait(f"/^[0-9]+$/.test({cell('1/=index+rank', 'received')} || '')", what="live stage numbers")
            devtools.wait(
                "document.querySelector('#processes tr[data-process=\"2\"] [data-field=state]')?.textContent === 'up'",
                what="process 2 shown up",
            )
            assert "read-only" in devtools.js("document.getElementById('mode').textContent")
            assert devtools.js("document.querySelectorAll('#stages button').length") == 0  # no actions without a token

            # The numbers shown match the console's stat once the page refreshed (every second; a
            # busy machine may take several).
            deadline = time.monotonic() + 20
            while True:
                stat = console_stat(int(ports["console"]))
                shown = int(devtools.js(cell("1/=index+rank", "received")))
                if shown == stat["=index+rank"] == 6 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert shown == stat["=index+rank"] == 6, (shown, stat)
            tickets = devtools.js("[...document.querySelectorAll('#tickets tbody td')].map(td => td.textContent)")
            assert tickets == ["=ticket+ticket", "login", "0", "0", "2"]

            # Scoreboard browser: the top 10, the next page, another tier, a member and its neighbours.
            members = "[...document.querySelectorAll('#sb-rows [data-field=member]')].map(td => td.textContent)"
            ranks = "[...document.querySelectorAll('#sb-rows [data-field=rank]')].map(td => td.textContent)"
            devtools.wait(f"{members}.length === 10", what="the first page of the scoreboard")
            assert devtools.js(members)[:2] == ["player40", "player39"] and devtools.js(ranks)[0] == "1"
            devtools.js("document.getElementById('sb-next').click()")
            devtools.wait(f"{ranks}[0] === '11'", what="the second page")
            assert devtools.js(members)[0] == "player30"
            assert devtools.js("document.getElementById('sb-page').textContent") == "ranks 11–20 of 40"
            devtools.js(
                "const t = document.getElementById('sb-tier'); t.value = '2'; t.dispatchEvent(new Event('change'))"
            )
            devtools.wait(f"{members}[0] === 'player1'", what="tier 2")
            devtools.js(
                "document.getElementById('sb-member').value = 'player5';"
                "document.querySelector('#sb-search button').click()"
            )
            devtools.wait("document.getElementById('sb-status').textContent.includes('rank 5')", what="the search")
            assert devtools.js(members) == [f"player{n}" for n in range(1, 12)]
            assert devtools.js("document.querySelector('#sb-rows tr.found').dataset.member") == "player5"

            # History charts drawn by uPlot.
            devtools.wait("document.querySelectorAll('.uplot').length === 2", what="the charts")
            shot = devtools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
            path = artifacts / "dashboard.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            assert path.stat().st_size > 10000
        finally:
            devtools.close()
