"""``python -m stagetx.client``: talk to the default application, once, interactively, or as load.

    python -m stagetx.client 'login alice; score 120; top 5'     # one-shot: commands, then exit
    python -m stagetx.client                                      # interactive: a prompt
    python -m stagetx.client load --players 50 --seconds 10       # simulated players

Exit status: 0 when every command was answered ``ok``, 1 when one was not (or a command line was
wrong), 2 when the server could not be reached. Output into a closed pipe (``| head -1``) ends the
client quietly. At a terminal the prompt has line editing and history (``readline``, where
Python has it).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlsplit

from stagetx.client.connection import DEFAULT_TIMEOUT, Connection, ConnectionClosed
from stagetx.client.load import LoadOptions, print_summary, run_load
from stagetx.client.protocol import (
    USAGE,
    CommandError,
    Document,
    ProtocolError,
    describe,
    describe_push,
    parse_command,
    split_commands,
)

try:
    import readline
except ImportError:  # not on every platform: the prompt then reads plain lines
    readline = None  # type: ignore[assignment]

#: A user or channel name the default application accepts (lua/packet.lua's valid_name).
NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8081


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options of both modes; the load parser leaves them unset so the main parser's values stay."""
    suppress = argparse.SUPPRESS
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST if defaults else suppress,
        help=f"server address (default {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT if defaults else suppress,
        help=f"server port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--url",
        default=None if defaults else suppress,
        help="a WebSocket address instead of --host/--port, e.g. ws://127.0.0.1:8082/play (or wss://)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else suppress,
        help="print each reply and push (or the load summary) as one JSON line",
    )
    parser.add_argument(
        "--timeout",
        type=duration,
        default=DEFAULT_TIMEOUT if defaults else suppress,
        help=f"seconds to wait for a connection or a reply (default {DEFAULT_TIMEOUT:g})",
    )


def _number(text: str, low: float, above: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low or (above and value == low):
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
    return value


def duration(text: str) -> float:
    """A ``--timeout`` or ``--seconds``: finite and above 0. NaN, 0 or a negative timeout used to
    reach the connection and read as 'cannot connect (is the server running?)'; ``--seconds nan``
    ran no player at all."""
    return _number(text, 0.0, True, "a finite number of seconds above 0")


def pause(text: str) -> float:
    """A ``--listen`` or ``--think-ms``: finite, 0 or more (bounded, whatever is typed)."""
    return _number(text, 0.0, False, "a finite number, 0 or more")


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stagetx.client",
        description="Client of the default stagetx application (docs/default-app.md).",
        epilog="commands (separate several with ';'):\n" + USAGE + "\n\nload mode: "
        "python -m stagetx.client load --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, True)
    parser.add_argument(
        "--listen",
        type=pause,
        default=0.0,
        metavar="SECONDS",
        help="after one-shot commands, keep printing chat lines for SECONDS",
    )
    parser.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        help="commands to run and exit, e.g. 'login alice; top'; none: interactive",
    )
    return parser


def load_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stagetx.client load",
        description="Drive simulated players; print throughput and latency.",
    )
    _common(parser, False)
    parser.add_argument("--players", type=int, default=10, help="concurrent players (default 10)")
    parser.add_argument("--seconds", type=duration, default=10.0, help="how long to run (default 10)")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help="most requests per player (default 100000)",
    )
    parser.add_argument("--channels", type=int, default=4, help="chat channels the players share (default 4)")
    parser.add_argument("--think-ms", type=pause, default=0.0, help="pause between a player's requests")
    parser.add_argument("--prefix", default="load", help="user and channel name prefix (default 'load')")
    parser.add_argument(
        "--board",
        default="load",
        help="the application's load-test board the scores go to (its load_board; default 'load'); "
        "each player removes its entry at the end",
    )
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not a loopback address")
    return parser


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class Printer:
    """Writes replies and pushes as text lines or JSON lines; redraws the prompt around pushes."""

    def __init__(self, out: TextIO, as_json: bool, prompt: str = "") -> None:
        self.out = out
        self.as_json = as_json
        self.prompt = prompt

    def reply(self, op: str, reply: Document) -> None:
        self._write([json.dumps(reply, default=str)] if self.as_json else describe(op, reply))

    def push(self, push: Document) -> None:
        line = json.dumps(push, default=str) if self.as_json else describe_push(push)
        if self.prompt:  # over the prompt line, then the prompt again with what was typed so far
            typed = readline.get_line_buffer() if readline is not None else ""
            self.out.write("\r\x1b[K" + line + "\n" + self.prompt + typed)
            self.out.flush()
        else:
            self._write([line])

    def error(self, text: str) -> None:
        self._write([json.dumps({"ok": False, "error": text})] if self.as_json else [f"error: {text}"])

    def usage(self) -> None:
        self._write([USAGE, "quit"])

    def _write(self, lines: list[str]) -> None:
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()


async def run_line(connection: Connection, line: str, printer: Printer, timeout: float) -> bool:
    """Run one command line; True when the server answered ok."""
    try:
        command = parse_command(line)
    except CommandError as err:
        printer.error(str(err))
        return False
    try:
        reply = await connection.request(command, timeout)
    except (TimeoutError, ProtocolError) as err:  # ProtocolError: too long to send, nothing was sent
        printer.error(str(err))
        return False
    printer.reply(command.op, reply)
    return bool(reply.get("ok"))


async def one_shot(connection: Connection, text: str, printer: Printer, timeout: float, listen: float) -> int:
    ok = True
    for line in split_commands(text):
        if line in ("help", "?"):
            printer.usage()
            continue
        ok = await run_line(connection, line, printer, timeout) and ok
    if listen > 0:
        await asyncio.wait({connection.closed}, timeout=listen)
    return 0 if ok else 1


def terminal_reader(prompt: str) -> Callable[[], str]:
    """Reads one line at a terminal with ``input``: line editing and history with ``readline``."""

    def read() -> str:
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""

    return read


async def interactive(connection: Connection, printer: Printer, timeout: float, read_line: Callable[[], str]) -> int:
    """Read command lines until end of input or ``quit``; pushed chat lines print as they come.

    ``read_line`` (``"line\\n"``, or ``""`` at the end) runs in a thread, one line each time the
    session asks for one, so that a prompt drawn by ``input`` comes after the previous reply."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    wanted = threading.Semaphore(0)

    def read() -> None:  # a daemon thread: a blocked read never holds the exit
        try:
            while True:
                wanted.acquire()
                line = read_line()
                loop.call_soon_threadsafe(lines.put_nowait, line)
                if line == "":
                    return
        except RuntimeError:  # the loop is closed: the session ended first
            pass

    threading.Thread(target=read, name="stdin", daemon=True).start()
    ok = True
    while True:
        wanted.release()
        line_task = asyncio.ensure_future(lines.get())
        either: set[asyncio.Future[Any]] = {line_task, connection.closed}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not line_task.done():
            line_task.cancel()
            printer.error("the server closed the connection")
            return 1
        line = line_task.result()
        if line == "" or line.strip() in ("quit", "exit"):
            return 0 if ok else 1
        if line.strip() in ("help", "?"):
            printer.usage()
            continue
        if line.strip():
            ok = await run_line(connection, line, printer, timeout) and ok


async def talk(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    words = " ".join(args.words)
    tty = not words and stdin.isatty() and out.isatty()
    printer = Printer(out, args.json, prompt=f"{args.host}:{args.port}> " if tty else "")
    try:
        connection = await Connection.open(args.host, args.port, args.timeout, on_push=printer.push, url=args.url)
    except (TimeoutError, OSError) as err:
        where = args.url or f"{args.host}:{args.port}"
        printer.error(f"cannot connect to {where}: {err} (is the server running? make run)")
        return 2
    try:
        if words:
            return await one_shot(connection, words, printer, args.timeout, args.listen)
        if tty:
            out.write("commands:\n" + USAGE + "\nquit\n")
        read_line = terminal_reader(printer.prompt) if tty else stdin.readline
        return await interactive(connection, printer, args.timeout, read_line)
    except ConnectionClosed as err:
        printer.error(str(err))
        return 1
    finally:
        await connection.close()


async def load(args: argparse.Namespace, out: TextIO) -> int:
    host = (urlsplit(args.url).hostname or "") if args.url else args.host
    if not args.allow_remote and not is_loopback(host):
        out.write(f"load: {host} is not a loopback address (use --allow-remote to load it anyway)\n")
        return 2
    if args.players < 1 or args.max_requests < 1:
        out.write("load: --players and --max-requests must be positive\n")
        return 2
    last = f"{args.prefix}-{args.players - 1}"  # the longest name; the channels' are no longer
    if not NAME.fullmatch(last):
        out.write(
            f"load: --prefix {args.prefix!r}: the players' names {args.prefix}-0 to {last} must be "
            "1 to 32 letters, digits, _ or - (the server refuses other logins)\n"
        )
        return 2
    options = LoadOptions(
        host=args.host,
        port=args.port,
        url=args.url,
        players=args.players,
        seconds=args.seconds,
        max_requests=args.max_requests,
        channels=args.channels,
        think_ms=args.think_ms,
        prefix=args.prefix,
        timeout=args.timeout,
        board=args.board,
    )
    summary = await run_load(options, out=sys.stderr)
    print_summary(summary, out, args.json)
    if summary["connected"] == 0:
        return 2
    return 0 if summary["errors"] == 0 and summary["failed_players"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    if args.words and args.words[0] == "load":
        args = load_parser().parse_args(args.words[1:], namespace=args)
        runner: Any = load(args, sys.stdout)
    else:
        runner = talk(args, sys.stdout, sys.stdin)
    try:
        return asyncio.run(runner)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): end quietly, and so does the exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
