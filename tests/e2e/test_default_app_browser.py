"""The default application's web client in a real browser: headless Chromium loads the page from
the front stages' WebSocket port of a real ``twistd -n stage``, logs in, posts a score, sees it in
the live top 10, and a second browser context (its own cookies and connection) sees the first
one's chat line; a screenshot goes to ``$STAGETX_ARTIFACTS`` (or the test's tmp dir). The client
tool talks to the same port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stagetx.client.connection import Connection
from stagetx.client.protocol import Command
from tests.e2e.test_broker_tls import write_tls_files
from tests.e2e.test_dashboard_browser import DevTools, find_browser
from tests.e2e.test_default_app import ROOT, App, _until
from tests.support import env_path, free_port


def app_with_browsers(root: Path, scheme: str = "ws", **values: Any) -> tuple[App, int]:
    """The default application, started, with its browser listener (and page) on a free port."""
    ws_port = free_port()
    browser = f"{scheme}://127.0.0.1:{ws_port}/play?json=16k,256k"
    app = App(root, browser=browser, page=str(ROOT / "web" / "play.html"), **values)
    config = json.loads(app.config_path.read_text())
    config["#services"]["tcp"].append(f"127.0.0.1:{ws_port}")
    app.config_path.write_text(json.dumps(config))
    return app.start(), ws_port


def test_a_chat_line_that_is_not_utf8_is_refused_and_every_player_hears_the_next(tmp_path: Path) -> None:
    """BSON binary text reaches Lua as a string, but a WebSocket player's JSON cannot carry it:
    accepted, it made the push to that player raise in the middle of the channel's members."""
    app, ws_port = app_with_browsers(tmp_path)

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        web_heard: list[dict[str, Any]] = []
        tcp_heard: list[dict[str, Any]] = []
        web = await Connection.open("127.0.0.1", 0, url=f"ws://127.0.0.1:{ws_port}/play", on_push=web_heard.append)
        tcp = await Connection.open("127.0.0.1", app.port, on_push=tcp_heard.append)
        for connection, user in ((web, "webby"), (tcp, "tcpy")):
            assert (await connection.request(Command("login", {"user": user})))["ok"]
            assert (await connection.request(Command("join", {"channel": "mix"})))["ok"]
        binary = await tcp.request(Command("say", {"channel": "mix", "text": bson.Binary(b"\xff\x00bin")}))
        assert (await tcp.request(Command("say", {"channel": "mix", "text": "after"})))["ok"]
        await _until(lambda: bool(web_heard and tcp_heard))
        await web.close()
        await tcp.close()
        return binary, web_heard, tcp_heard

    try:
        binary, web_heard, tcp_heard = asyncio.run(scenario())
    finally:
        app.stop()
    assert binary["error"] == "text: 1 to 500 bytes of UTF-8"
    assert [p["text"] for p in web_heard] == [p["text"] for p in tcp_heard] == ["after"]


def run_client(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stagetx.client", *args],
        env={**os.environ, "PYTHONPATH": env_path(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_client_and_its_load_tool_talk_over_a_websocket(tmp_path: Path) -> None:
    app, ws_port = app_with_browsers(tmp_path)
    try:
        url = f"ws://127.0.0.1:{ws_port}/play"
        done = run_client("--url", url, "--json", "login carol; score 77; top 3")
        assert done.returncode == 0, done.stdout + done.stderr
        replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert replies[0]["user"] == "carol" and replies[1]["best"] == 77
        assert {"rank": 1, "user": "carol", "score": 77} in replies[2]["rows"]

        done = run_client("--url", url, "load", "--players", "4", "--seconds", "2", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        assert (summary["connected"], summary["errors"], summary["failed_players"]) == (4, 0, 0)

        refused = run_client("--url", f"ws://127.0.0.1:{ws_port}/nowhere", "top")
        assert refused.returncode == 2 and "HTTP 404" in refused.stdout + refused.stderr
    finally:
        app.stop()


def open_in_new_context(devtools: DevTools, url: str) -> str:
    """A new tab in a fresh browser context (like a second browser); its DevTools session id."""
    devtools.session = None
    context = devtools.call("Target.createBrowserContext")["browserContextId"]
    target = devtools.call("Target.createTarget", {"url": url, "browserContextId": context})["targetId"]
    session: str = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    devtools.session = session
    return session


def log_in(devtools: DevTools, user: str) -> None:
    devtools.wait("document.getElementById('status')?.textContent.startsWith('connected')", what="the WebSocket")
    devtools.js(f"document.getElementById('user').value = '{user}'; document.getElementById('login').click()")
    devtools.wait("document.getElementById('status').textContent === 'in room lobby'", what=f"{user} in the lobby")


@contextlib.contextmanager
def player_page(tmp_path: Path, user: str) -> Iterator[tuple[App, DevTools, str]]:
    """The default application and a browser page (of the URL given) logged in as ``user``;
    both stopped after."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (install the Debian package chromium; .ci/run does)")
    app, ws_port = app_with_browsers(tmp_path)
    devtools = DevTools(browser, tmp_path / "profile")
    url = f"http://127.0.0.1:{ws_port}/"
    try:
        open_in_new_context(devtools, url)
        log_in(devtools, user)
        yield app, devtools, url
    finally:
        devtools.close()
        app.stop()


TOP = "[...document.querySelectorAll('#top tr')].map(tr => tr.dataset.user + '=' + tr.children[2].textContent)"


@pytest.mark.timeout(180)
def test_browser_client_logs_in_scores_sees_the_top_10_and_chats(tmp_path: Path) -> None:
    with player_page(tmp_path, "alice") as (_, devtools, url):
        alice = devtools.session
        devtools.js("document.getElementById('points').value = '4321'; document.getElementById('send-score').click()")
        devtools.wait(f"{TOP}.includes('alice=4321')", what="alice's score in the top 10")
        assert devtools.js("document.getElementById('mine').textContent").startswith("best 4321, rank 1")

        bob = open_in_new_context(devtools, url)
        log_in(devtools, "bob")
        devtools.wait(f"{TOP}.includes('alice=4321')", what="the top 10 in bob's browser")
        devtools.js("document.getElementById('points').value = '99'; document.getElementById('send-score').click()")

        devtools.session = alice
        devtools.wait(f"{TOP}.join() === 'alice=4321,bob=99'", what="bob's score in alice's live top 10")

        seen = "[...document.querySelectorAll('#chat li')].some(li => li.textContent.includes('hello from alice'))"
        for n in range(20):  # bob's front process may still be registering the room with the route stage
            devtools.session = alice
            devtools.js(
                f"document.getElementById('say-text').value = 'hello from alice {n}';"
                "document.getElementById('say').click()"
            )
            devtools.session = bob
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not devtools.js(seen):
                time.sleep(0.1)
            if devtools.js(seen):
                break
        assert devtools.js(seen), "bob never saw alice's chat line"
        assert devtools.js("document.querySelector('#chat li').dataset.from") == "alice"
        artifacts = Path(os.environ.get("STAGETX_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = devtools.call("Page.captureScreenshot", {"format": "png"})
        (artifacts / "web-client.png").write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.timeout(180)
def test_the_browser_client_and_the_client_tool_over_wss(tmp_path: Path) -> None:
    """The page over HTTPS and its WebSocket over TLS; then ``--url wss://`` trusting the test CA
    (and refusing another one). Chromium trusts exactly the test server's
    key (``--ignore-certificate-errors-spki-list``): headless Chromium reads no CA file, and adding
    one to its NSS store needs certutil; every other certificate error still fails."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium found (install the Debian package chromium; .ci/run does)")
    write_tls_files(tmp_path)
    pem = (tmp_path / "tls" / "server.pem").read_bytes()
    spki = (
        x509.load_pem_x509_certificate(pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    tls = {"cert": str(tmp_path / "tls" / "server.pem"), "key": str(tmp_path / "tls" / "server.key")}
    app, wss_port = app_with_browsers(tmp_path, scheme="wss", **{"#tls": tls})
    devtools = DevTools(browser, tmp_path / "profile", (f"--ignore-certificate-errors-spki-list={pin}",))
    try:
        open_in_new_context(devtools, f"https://127.0.0.1:{wss_port}/")
        log_in(devtools, "dave")
        assert devtools.js("location.protocol") == "https:"
        devtools.js("document.getElementById('points').value = '5'; document.getElementById('send-score').click()")
        devtools.wait(f"{TOP}.includes('dave=5')", what="dave's score over wss")

        url = f"wss://127.0.0.1:{wss_port}/play"
        done = run_client("--url", url, "--json", "login erin; top 3", SSL_CERT_FILE=str(tmp_path / "tls" / "ca.pem"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"user": "dave"' in done.stdout or '"user":"dave"' in done.stdout
        untrusted = run_client("--url", url, "top", SSL_CERT_FILE=str(tmp_path / "tls" / "wrong-ca.pem"))
        assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout + untrusted.stderr
    finally:
        devtools.close()
        app.stop()


@pytest.mark.timeout(120)
def test_after_a_refused_join_the_page_can_go_back_to_its_room(tmp_path: Path) -> None:
    """Switching rooms leaves the old one first: when the new join is refused the player is in
    no room, and joining the old one again must not be skipped as 'already there'."""
    with player_page(tmp_path, "rover") as (_, devtools, _):
        join = "document.getElementById('room').value = '{}'; document.getElementById('join').click()"
        devtools.js(join.format("bad.name"))
        devtools.wait("document.getElementById('status').className === 'error'", what="the refused join")
        devtools.js(join.format("lobby"))
        devtools.wait("document.getElementById('status').textContent === 'in room lobby'", what="back in the lobby")
        devtools.js("document.getElementById('say-text').value = 'back'; document.getElementById('say').click()")
        devtools.wait("document.querySelector('#chat li')?.textContent === 'rover: back'", what="rover's line")


@pytest.mark.timeout(120)
def test_a_page_whose_server_went_away_stops_asking_and_keeps_nothing_waiting(tmp_path: Path) -> None:
    """After the connection closed, the page asked for the top 10 every second on it and kept
    each unanswerable request in its table of waiting replies for good."""
    with player_page(tmp_path, "leaver") as (app, devtools, _):
        app.stop()
        devtools.wait("document.getElementById('status').textContent.startsWith('disconnected')", what="the close")
        devtools.js("refreshTop(); refreshTop(); ask('top', {n: 10}); 0")  # not awaited: they never answer
        assert devtools.js("waiting.size") == 0
        assert devtools.js("document.getElementById('status').textContent").startswith("disconnected")
