"""what a configuration means, and the one-line errors for broken ones."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from stagetx.config import (
    ConfigError,
    DiscoveryGroup,
    DnsName,
    HostPort,
    LogGroup,
    endpoint_is_loopback,
    load_config,
    parse_config,
)

LUA_MAIN = {"%package": ["[0]lua"], "=lua+stage": "start"}


def parse(raw: dict[str, Any], base_dir: Path) -> Any:
    return parse_config(raw, str(base_dir))


def test_minimal_lua_stage(app_dir: Path) -> None:
    config = parse({"#startup": [["=lua+stage"]], "=lua+stage": LUA_MAIN}, app_dir)
    (stage,) = config.stages
    assert (stage.name, stage.type, stage.id, stage.group, stage.instance) == (
        "=lua+stage",
        "lua",
        "stage",
        0,
        0,
    )
    assert stage.main == str(app_dir / "lua" / "start.lua")
    assert stage.settings == {
        "%package": ["[0]lua"],
        "%memory": 256 * 1024 * 1024,
        "%budget": 1000,
        "%recheck": [600000, 60000],
    }
    assert config.router == (1500, 900)
    assert config.services == () and config.admin is None and config.secret is None
    assert config.notices == ()


def test_type_wide_object_holds_main_scripts_of_several_stages(app_dir: Path) -> None:
    raw = {
        "#startup": [["=lua+a", "=lua+b"]],
        "=lua": {"%package": ["lua"], "%memory": "64m", "=lua+a": "start", "=lua+b": "other"},
    }
    a, b = parse(raw, app_dir).stages
    assert a.main == str(app_dir / "lua" / "start.lua")
    assert b.main == str(app_dir / "lua" / "other.lua")
    assert a.settings["%memory"] == b.settings["%memory"] == 64 * 1024 * 1024


def test_top_level_script_name_takes_type_wide_settings(app_dir: Path) -> None:
    raw = {
        "#startup": [["=lua+stage"]],
        "=lua": {"%package": ["lua"], "%budget": 50},
        "=lua+stage": "start",
    }
    (stage,) = parse(raw, app_dir).stages
    assert stage.main == str(app_dir / "lua" / "start.lua")
    assert stage.settings["%budget"] == 50


def test_own_settings_override_type_wide_ones(app_dir: Path) -> None:
    raw = {
        "#startup": [["=lua+stage"]],
        "=lua": {"%package": ["nowhere"], "%budget": 50, "motd": "hi", "=lua+stage": "other"},
        "=lua+stage": {"%package": ["[0]lua"], "%budget": 70, "=lua+stage": "start"},
    }
    (stage,) = parse(raw, app_dir).stages
    assert stage.settings["%budget"] == 70
    assert stage.settings["%package"] == ["[0]lua"]
    assert stage.settings["motd"] == "hi"
    assert stage.main == str(app_dir / "lua" / "start.lua")


def test_main_script_is_searched_along_package_with_forced_positions(app_dir: Path) -> None:
    raw = {
        "#startup": [["=lua+s"]],
        "=lua+s": {"%package": ["missing", "[0]lib", "lua"], "=lua+s": "util.strings"},
    }
    (stage,) = parse(raw, app_dir).stages
    assert stage.main == str(app_dir / "lib" / "util" / "strings.lua")


def test_luajit_stages_use_their_own_type_wide_settings(app_dir: Path) -> None:
    raw = {
        "#startup": [["=luajit+fast"]],
        "=lua": {"%budget": 5},
        "=luajit": {"%package": ["lua"], "=luajit+fast": "start"},
    }
    (stage,) = parse(raw, app_dir).stages
    assert stage.type == "luajit" and stage.settings["%budget"] == 1000


def test_original_platform_spellings_load_with_one_notice_each(app_dir: Path) -> None:
    raw = {
        "#license": "XXXX-XXXX",
        "#startup": [["lua.so+stage", "index.so+rank"]],
        "lua.so": {"%package": ["lua"], "%odbc": {"dsn": "x"}, "verbose": True},
        "lua.so+stage": {"%cluster": [1], "%shiny": 1, "lua.so+stage": "start"},
        "index.so+rank": "score/",
    }
    config = parse(raw, app_dir)
    stage, rank = config.stages
    assert stage.name == "=lua+stage" and stage.main == str(app_dir / "lua" / "start.lua")
    assert (rank.name, rank.settings) == ("=index+rank", "score/")
    assert sorted(config.notices) == sorted(
        [
            "#license: not used by stagetx, ignored",
            "lua.so.%odbc: not supported by stagetx, ignored",
            "lua.so.verbose: not supported by stagetx, ignored",
            "lua.so+stage.%cluster: not supported by stagetx, ignored",
            "lua.so+stage.%shiny: not supported by stagetx, ignored",
        ]
    )
    for unknown in ("%odbc", "verbose", "%cluster", "%shiny"):
        assert unknown not in stage.settings


def test_groups_instances_and_replicas(app_dir: Path) -> None:
    raw = {
        "#startup": [["=lua+stage", "=index+rank"], ["=lua+stage"], ["=route+route"]],
        "=lua+stage": LUA_MAIN,
        "=index+rank": "rank/",
    }
    config = parse(raw, app_dir)
    assert [[(s.name, s.group, s.instance) for s in g] for g in config.startup] == [
        [("=lua+stage", 0, 0), ("=index+rank", 0, 1)],
        [("=lua+stage", 1, 2)],
        [("=route+route", 2, 3)],
    ]
    assert config.startup[2][0].settings is None
    assert config.startup[0][0].main == config.startup[1][0].main


def test_builtin_stage_settings_merge_type_wide_objects(app_dir: Path) -> None:
    raw = {
        "#startup": [["=curl+agent", "=curl+other"]],
        "=curl": {"timeout": 1000, "user-agent": "x"},
        "=curl+agent": {"timeout": 5},
    }
    agent, other = parse(raw, app_dir).stages
    assert agent.settings == {"timeout": 5, "user-agent": "x"}
    assert other.settings == {"timeout": 1000, "user-agent": "x"}


def test_router_and_threads_take_the_default_for_a_missing_value(app_dir: Path) -> None:
    """The original platform read ``#router`` and ``#threads`` value by value (its bin/conf files
    give one value, or ``#threads`` as a plain number): a value left out keeps its default."""
    config = parse({"#startup": [["=route+rank"]], "#router": [1000], "#threads": 8}, app_dir)
    assert config.router == (1000, 900) and config.threads == (8, 10000)
    config = parse({"#startup": [["=route+rank"]], "#router": [], "#threads": [2]}, app_dir)
    assert config.router == (1500, 900) and config.threads == (2, 10000)


def test_every_server_key(app_dir: Path) -> None:
    (app_dir / "logs").mkdir()
    raw = {
        "#startup": [["=route+rank"]],
        "#services": {"tcp": ["0.0.0.0:8081", "[::1]:8082"]},
        "#router": [1000, 500],
        "#cluster": [
            9000,
            "peer.example:9000",
            "=10.0.0.9:9000",
            "udp://239.1.2.3:7000",
            "udp://239.1.2.4:7001?interface=127.0.0.1&ttl=3",
        ],
        "#threads": [8, 500],
        "#secret": "s3cret",
        "#log": {"db": {"level": "warning", "file": "logs/db.log"}, "net": {}},
        "#admin": {"console": "tcp:9190:interface=127.0.0.1", "http": "unix:/tmp/a.sock"},
        "motd": {"text": "welcome"},
    }
    config = parse(raw, app_dir)
    assert config.services == (HostPort("0.0.0.0", 8081), HostPort("::1", 8082))
    assert [str(s) for s in config.services] == ["0.0.0.0:8081", "[::1]:8082"]
    assert config.router == (1000, 500) and config.threads == (8, 500)
    assert config.cluster.listen == 9000
    assert config.cluster.peers == (HostPort("peer.example", 9000),)
    assert config.cluster.backups == (HostPort("10.0.0.9", 9000),)
    assert config.cluster.discovery == (
        DiscoveryGroup("239.1.2.3", 7000, "127.0.0.1", 1),
        DiscoveryGroup("239.1.2.4", 7001, "127.0.0.1", 3),
    )
    assert config.secret == "s3cret"
    dns = parse(
        {**raw, "#cluster": ["dns://game.example:9000", "dns://g.test:1?server=127.0.0.1:53&every=0.5"]}, app_dir
    )
    assert dns.cluster.dns == (
        DnsName("game.example", 9000, None, 5.0),
        DnsName("g.test", 1, HostPort("127.0.0.1", 53), 0.5),
    )
    assert config.log == {
        "db": LogGroup("warn", str(app_dir / "logs" / "db.log")),
        "net": LogGroup("info", None),
    }
    assert config.admin is not None and config.admin.token is None
    assert config.admin.console == "tcp:9190:interface=127.0.0.1"
    assert config.values == {"motd": {"text": "welcome"}}
    assert config.raw == raw


def test_one_port_on_different_interfaces_is_allowed(app_dir: Path) -> None:
    raw = {
        "#startup": [["=route+a"]],
        "#services": {"tcp": ["0.0.0.0:8081", "[::1]:8082"]},
        "#cluster": [{"listen": "127.0.0.2:9190"}],
        "#admin": {"console": "tcp:9190:interface=127.0.0.1", "http": "tcp6:8081:interface=\\:\\:1"},
    }
    assert parse(raw, app_dir).admin.http == "tcp6:8081:interface=\\:\\:1"


def test_admin_beyond_loopback_is_allowed_with_a_token(app_dir: Path) -> None:
    raw = {"#startup": [["=route+rank"]], "#admin": {"http": "tcp:9191", "token": "t"}}
    admin = parse(raw, app_dir).admin
    assert admin is not None and (admin.http, admin.token) == ("tcp:9191", "t")


@pytest.mark.parametrize(
    ("description", "loopback"),
    [
        ("tcp:9190:interface=127.0.0.1", True),
        ("tcp:9190:127.0.0.2", True),
        (r"tcp6:9190:interface=\:\:1", True),
        ("tcp:9190:interface=localhost", True),
        ("9190", False),
        ("tcp:9190", False),
        ("tcp:9190:interface=0.0.0.0", False),
        ("tcp:9190:interface=192.168.1.4", False),
        ("ssl:9190:privateKey=k.pem:interface=127.0.0.1", True),
        ("ssl:9190:k.pem:127.0.0.1", False),
        ("unix:/run/stage.sock", True),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_endpoint_loopback_rule(description: str, loopback: bool) -> None:
    assert endpoint_is_loopback(description, "#admin.console") is loopback


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("64k", 65536),
        ("2m", 2 * 1024**2),
        ("1g", 1024**3),
        ("3M", 3 * 1024**2),
        ("512", 512),
        (4096, 4096),
        ("16mb", 16 * 1024**2),
    ],
)
def test_memory_units(app_dir: Path, written: Any, size: int) -> None:
    raw = {"#startup": [["=lua+stage"]], "=lua+stage": {**LUA_MAIN, "%memory": written}}
    assert parse(raw, app_dir).stages[0].settings["%memory"] == size


def test_preload_resolves_against_the_config_directory(app_dir: Path) -> None:
    raw = {"#startup": [["=lua+stage"]], "=lua+stage": {**LUA_MAIN, "%preload": "preload"}}
    assert parse(raw, app_dir).stages[0].settings["%preload"] == str(app_dir / "preload")


BROKEN: list[tuple[dict[str, Any], str]] = [
    ({}, "#startup: missing (which stages run in which process)"),
    ({"#startup": [["=lau+x"]]}, '#startup[0][0]: unknown stage type "=lau"'),
    ({"#startup": [["=route+a"], ["=lau+x"]]}, '#startup[1][0]: unknown stage type "=lau"'),
    ({"#startup": "=lua+stage"}, "#startup: expected a non-empty list of process lists"),
    ({"#startup": [[]]}, "#startup[0]: expected a non-empty list of stage names"),
    ({"#startup": [[7]]}, "#startup[0][0]: expected a stage name, got 7"),
    (
        {"#startup": [["=index"]]},
        '#startup[0][0]: "=index" names no stage id (expected "=type+id")',
    ),
    ({"#startup": [["lua+x"]]}, '#startup[0][0]: bad stage name "lua+x" (expected "=type+id")'),
    ({"#startup": [["=index+a:b"]]}, '#startup[0][0]: bad stage id "a:b" in "=index+a:b"'),
    (
        {"#startup": [["=lua+x"]]},
        '#startup[0][0]: "=lua+x" has no main script (set "=lua+x": "script")',
    ),
    (
        {"#startup": [["=lua+x"]], "=lua+x": {"=lua+x": "nothere"}},
        '=lua+x.=lua+x: script "nothere" not found along %package ["[0]"]',
    ),
    (
        {"#startup": [["=lua+x"]], "=lua+x": "start"},
        '=lua+x: script "start" not found along %package ["[0]"]',
    ),
    ({"#startup": [["=route+a"]], "#bogus": 1}, "#bogus: unknown key"),
    ({"#startup": [["=route+a"]], "=lau+x": {}}, '=lau+x: unknown stage type "=lau"'),
    (
        {"#startup": [["=route+a"]], "=lua+x": 5},
        "=lua+x: expected a settings object or a main script name",
    ),
    ({"#startup": [["=route+a"]], "=lua": "start"}, '=lua: expected an object, got "start"'),
    (
        {"#startup": [["=route+a"]], "=lua+x": {"=lua+y": "start"}},
        '=lua+x.=lua+y: not a main script of "=lua+x"',
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"=luajit+y": "start"}},
        '=lua.=luajit+y: not a main script of "=lua"',
    ),
    ({"#startup": [["=route+a"]], "=lua+a": {}, "lua.so+a": {}}, "lua.so+a: duplicate of '=lua+a'"),
    (
        {"#startup": [["=route+a"]], "=lua": {"%memory": "lots"}},
        '=lua.%memory: expected a size such as 256m, at most 1024g, got "lots"',
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"%memory": 0}},
        "=lua.%memory: expected a size such as 256m, at most 1024g, got 0",
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"%budget": 0}},
        "=lua.%budget: expected milliseconds (an integer from 1 to 31536000000)",
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"%package": [1]}},
        "=lua.%package: expected a list of directories",
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"%recheck": [1]}},
        "=lua.%recheck: expected [integer, integer], each from 0 to 31536000000",
    ),
    (
        {
            "#startup": [["=lua+x"]],
            "=lua+x": {"%package": ["lua"], "%preload": "gone", "=lua+x": "start"},
        },
        '#startup[0][0]: %preload "APP/gone" does not exist',
    ),
    (
        {"#startup": [["=route+a"]], "#router": [1500, "900"]},
        "#router: expected [integer, integer], each from 1 to 31536000000",
    ),
    (
        {"#startup": [["=route+a"]], "#router": [1500, 900, 1]},
        "#router: expected [integer, integer], each from 1 to 31536000000",
    ),
    (
        {"#startup": [["=route+a"]], "#threads": ["4", 10]},
        "#threads: expected [integer, integer], each from 1 to 1000000000",
    ),
    (
        {"#startup": [["=route+a"]], "#threads": [True, 10]},
        "#threads: expected [integer, integer], each from 1 to 1000000000",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [9000, "nohostport"]},
        '#cluster[1]: bad address "nohostport" (expected "host:port")',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [9000, 9001]},
        "#cluster[1]: a second listening port (9000 is already set)",
    ),
    ({"#startup": [["=route+a"]], "#cluster": [70000]}, "#cluster[0]: port out of range: 70000"),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"listen": "0.0.0.0:9000"}], "#secret": "s"},
        "#cluster[0].advertise: needed when listening on every interface",
    ),
    (
        {
            "#startup": [["=route+a"]],
            "#cluster": [{"listen": "0.0.0.0:9000", "advertise": "0.0.0.0:9000"}],
            "#secret": "s",
        },
        "#cluster[0].advertise: 0.0.0.0:9000 is no address another server can dial",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"listen": "[::]:9000", "advertise": "[::]:9000"}], "#secret": "s"},
        "#cluster[0].advertise: [::]:9000 is no address another server can dial",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"listen": "10.1.2.3:9000"}]},
        "#cluster: listening beyond loopback needs #secret (shared by the cluster's servers)",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"listen": "127.0.0.1:9000", "queue": 0}]},
        "#cluster[0].queue: expected a positive integer up to 1000000000",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"port": 9000}]},
        '#cluster[0]: unknown setting "port" (listen, advertise, queue, tls)',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["udp://10.0.0.1:7000"]},
        '#cluster[0]: "10.0.0.1" is not a multicast group address',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [9000, "udp://[ff02::1]:7000"]},
        '#cluster[1]: "ff02::1" is an IPv6 group; discovery announces on IPv4 groups',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["udp://239.1.2.3:7000?interface=192.0.2.77"]},
        "#cluster[0]: interface 192.0.2.77 is not an address of this host (Cannot assign requested address)",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["udp://239.1.2.3:7000?interface=eth0"]},
        '#cluster[0]: interface "eth0" is not an IPv4 address',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["udp://239.1.2.3:7000?ttl=300"]},
        '#cluster[0]: ttl "300" is not an integer from 0 to 255',
    ),
    (
        {
            "#startup": [["=route+a"]],
            "#cluster": [{"listen": "127.0.0.1:7000", "tls": {"ca": "ca.pem", "cert": "c", "key": "k"}}],
        },
        "#cluster[0].tls.ca: cannot read APP/ca.pem: No such file or directory",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"listen": "127.0.0.1:7000", "tls": {"ca": "x.pem"}}]},
        "#cluster[0].tls.cert: missing (a PEM file)",
    ),
    (
        {
            "#startup": [["=route+a"]],
            "#cluster": [{"tls": {"ca": "lua/other.lua", "cert": "lua/other.lua", "key": "lua/other.lua"}}],
        },
        "#cluster[0].tls.ca: not a PEM certificate ([('PEM routines', '', 'no start line')])",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["dns://bad name:7000"]},
        '#cluster[0]: "bad name" is not a DNS name or an IP address',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["dns://game.example:7000?every=0"]},
        '#cluster[0]: every "0" is not a number of seconds (0.1-3600)',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["dns://game.example:7000?server=nowhere"]},
        '#cluster[0] server: bad address "nowhere" (expected "host:port")',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["udp://239.1.2.3:7000?hops=2"]},
        '#cluster[0]: bad option "hops=2" (interface=ADDR, ttl=N, each once)',
    ),
    ({"#startup": [["=route+a"]], "#cluster": {"peer": 1}}, "#cluster: expected a list"),
    (
        {"#startup": [["=route+a"]], "#services": {"udp": ["0.0.0.0:1"]}},
        '#services.udp: unknown protocol (only "tcp")',
    ),
    (
        {"#startup": [["=route+a"]], "#services": {"tcp": ["0.0.0.0:99999"]}},
        '#services.tcp[0]: bad address "0.0.0.0:99999" (expected "host:port")',
    ),
    (
        {"#startup": [["=route+a"]], "#services": {"tcp": ["a:1", "a:1"]}},
        "#services.tcp[1]: a:1 is listed twice",
    ),
    ({"#startup": [["=route+a"]], "#secret": ""}, '#secret: expected a non-empty string, got ""'),
    (
        {"#startup": [["=route+a"]], "#log": {"db": {"level": "loud"}}},
        '#log.db.level: unknown level "loud"',
    ),
    ({"#startup": [["=route+a"]], "#log": {"db": {"lvl": "info"}}}, "#log.db.lvl: unknown key"),
    (
        {"#startup": [["=route+a"]], "#admin": {"console": "tcp:9190"}},
        '#admin.console: listens beyond loopback without #admin.token (add a token or ":interface=127.0.0.1")',
    ),
    (
        {"#startup": [["=route+a"]], "#admin": {"http": "tcp:9190:interface=0.0.0.0"}},
        '#admin.http: listens beyond loopback without #admin.token (add a token or ":interface=127.0.0.1")',
    ),
    (
        {"#startup": [["=route+a"]], "#admin": {"console": "tcp:abc", "token": "t"}},
        '#admin.console: bad endpoint "tcp:abc": port must be an integer',
    ),
    ({"#startup": [["=route+a"]], "#admin": {"shell": "tcp:1"}}, "#admin.shell: unknown key"),
    # Twisted's own endpoint parser judges the description, as the admin service would at start
    (
        {"#startup": [["=route+a"]], "#admin": {"console": "tcp:9190:interface=127.0.0.1:bogus=1"}},
        '#admin.console: bad endpoint "tcp:9190:interface=127.0.0.1:bogus=1":'
        " _parseTCP() got an unexpected keyword argument 'bogus'",
    ),
    (
        {"#startup": [["=route+a"]], "#admin": {"http": "foo:9191", "token": "t"}},
        "#admin.http: bad endpoint \"foo:9191\": Unknown endpoint type: 'foo'",
    ),
    (
        {"#startup": [["=route+a"]], "#admin": {"console": "tcp:\u00b2:interface=127.0.0.1"}},
        '#admin.console: bad endpoint "tcp:\u00b2:interface=127.0.0.1": port must be an integer',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [9000, "udp://239.1.2.3:7000?ttl=\u00b2"]},
        '#cluster[1]: ttl "\\u00b2" is not an integer from 0 to 255',
    ),
    # values a Lua stage reads must reach Lua: the child would fail at every start
    (
        {"#startup": [["=route+a"]], "big": 2**64},
        "big: 18446744073709551616 does not fit a Lua integer (-9223372036854775808 to 9223372036854775807)",
    ),
    (
        {"#startup": [["=route+a"]], "t": {"a": [1, -(2**63) - 1]}},
        "t.a[1]: -9223372036854775809 does not fit a Lua integer (-9223372036854775808 to 9223372036854775807)",
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"big": 2**63}},
        "=lua.big: 9223372036854775808 does not fit a Lua integer (-9223372036854775808 to 9223372036854775807)",
    ),
    ({"#startup": [["=route+a"]], "s": "a\ud800b"}, 's: "\\ud800" is a lone surrogate, not text'),
    (
        {"#startup": [["=route+a"]], "t": {"k\udc80": 1}},
        't: key "k\\udc80": "\\udc80" is a lone surrogate, not text',
    ),
    ({"#startup": [["=route+a"]], "#secret": "s\ud800"}, '#secret: "\\ud800" is a lone surrogate, not text'),
    (
        {"#startup": [["=route+a"]], "#admin": {"console": "tcp:9190:interface=127.0.0.1", "token": "t\udfff"}},
        '#admin.token: "\\udfff" is a lone surrogate, not text',
    ),
    ({"#startup": [["=route+a\ud800"]]}, '#startup[0][0]: bad stage id "a\ud800" in "=route+a\ud800"'),
    (
        {"#startup": [["=route+a"]], "deep": json.loads("[" * 70 + "]" * 70)},
        "deep" + "[0]" * 65 + ": nested deeper than 64 levels, more than Lua stages take",
    ),
    # sizes a Lua runtime cannot take stopped the stage with an OverflowError
    (
        {"#startup": [["=route+a"]], "=lua": {"%budget": 2**63}},
        "=lua.%budget: expected milliseconds (an integer from 1 to 31536000000)",
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"%memory": "99999999999999999999g"}},
        '=lua.%memory: expected a size such as 256m, at most 1024g, got "99999999999999999999g"',
    ),
    (
        {"#startup": [["=route+a"]], "=lua": {"%memory": 1024**4 + 1}},
        "=lua.%memory: expected a size such as 256m, at most 1024g, got 1099511627777",
    ),
    (
        {"#startup": [["=route+a"]], "#threads": [4, 10**30]},
        "#threads: expected [integer, integer], each from 1 to 1000000000",
    ),
    # files the children would open: checked now, naming the key
    (
        {"#startup": [["=route+a"]], "#log": {"stage": {"file": "logs/stage.log"}}},
        "#log.stage.file: directory APP/logs does not exist",
    ),
    ({"#startup": [["=route+a"]], "#log": {"stage": {"file": "lua"}}}, "#log.stage.file: APP/lua is a directory"),
    # two listening sockets on one port of one interface: the second could only fail once running
    (
        {
            "#startup": [["=route+a"]],
            "#admin": {"console": "tcp:9190:interface=127.0.0.1", "http": "tcp:9190:127.0.0.1"},
        },
        "#admin.http: port 9190 is also the one of #admin.console",
    ),
    (
        {"#startup": [["=route+a"]], "#services": {"tcp": ["0.0.0.0:8081"]}, "#admin": {"http": "tcp:8081:127.0.0.1"}},
        "#admin.http: port 8081 is also the one of #services.tcp[0]",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [7101], "#admin": {"console": "tcp:7101:interface=127.0.0.1"}},
        "#admin.console: port 7101 is also the one of #cluster",
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"listen": "127.0.0.1:8081"}], "#services": {"tcp": ["[::]:8081"]}},
        "#cluster: port 8081 is also the one of #services.tcp[0]",
    ),
    # a NUL, a blank or a non-ASCII letter where no file name, address or token can hold it: the
    # file and socket calls would raise ValueError (in --check, or in a child at every start)
    (
        {"#startup": [["=route+a"]], "#log": {"stage": {"file": "a\0b"}}},
        '#log.stage.file: "a\\u0000b" holds a NUL character',
    ),
    (
        {"#startup": [["=route+a"]], "#tls": {"cert": "a\0b", "key": "k"}},
        '#tls.cert: "a\\u0000b" holds a NUL character',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": [{"tls": {"ca": "a\0b", "cert": "c", "key": "k"}}]},
        '#cluster[0].tls.ca: "a\\u0000b" holds a NUL character',
    ),
    ({"#startup": [["=index+rank"]], "=index+rank": "a\0b"}, "=index+rank: 'APP/a\\x00b' holds a NUL character"),
    (
        {"#startup": [["=route+a"]], "#services": {"tcp": ["ho st:80"]}},
        '#services.tcp[0]: "ho st" is not a DNS name or an IP address',
    ),
    (
        {"#startup": [["=route+a"]], "#cluster": ["peer\0:7000"]},
        '#cluster[0]: "peer\\u0000" is not a DNS name or an IP address',
    ),
    (
        {"#startup": [["=route+a"]], "#admin": {"console": "tcp:9190:interface=127.0.0.1", "token": " s3cret "}},
        "#admin.token: expected printable ASCII without blanks (such as a random hex string)",
    ),
    (
        {"#startup": [["=route+a"]], "#admin": {"http": "tcp:9191:interface=127.0.0.1", "token": "s\u00e9same"}},
        "#admin.token: expected printable ASCII without blanks (such as a random hex string)",
    ),
    (
        {"#startup": [["=curl+web"]], "=curl+web": {"ca-file": "missing.pem"}},
        "=curl+web.ca-file: cannot read APP/missing.pem: No such file or directory",
    ),
    (
        {"#startup": [["=curl+web"]], "=curl+web": {"ca-file": "lua/start.lua"}},
        "=curl+web.ca-file: APP/lua/start.lua: no PEM certificate found",
    ),
    (
        {"#startup": [["=curl+web"]], "=curl+web": {"concurrency": float("inf")}},
        "=curl+web.concurrency: wrong value Infinity",
    ),
    (
        {"#startup": [["=curl+web"]], "=curl+web": {"max-size": "8M"}},
        '=curl+web.max-size: wrong value "8M"',
    ),
    (
        {"#startup": [["=curl+web"]], "=curl+web": {"per-host": 2.5}},
        "=curl+web.per-host: wrong value 2.5",
    ),
    (
        {"#startup": [["=index+rank"]], "=index+rank": {"redis": "rediss://127.0.0.1:6390/0", "ca": "missing.pem"}},
        "=index+rank.ca: cannot read APP/missing.pem: No such file or directory",
    ),
    (
        {"#startup": [["=index+rank"]], "=index+rank": {"redis": "redis://127.0.0.1:6390/0", "timeout": float("nan")}},
        "=index+rank.timeout: expected milliseconds from above 0 to 31536000000",
    ),
    (
        {"#startup": [["=index+rank"]], "=index+rank": "lua/start.lua"},
        "=index+rank: APP/lua/start.lua is not a directory",
    ),
    (
        {"#startup": [["=index+rank"]], "=index+rank": {"dir": "lua/start.lua/scores"}},
        "=index+rank.dir: cannot create APP/lua/start.lua/scores: APP/lua/start.lua is not a directory",
    ),
    (
        {"#startup": [["=index+rank"]], "=index+rank": {"dir": "scores", "fsync": float("nan")}},
        "=index+rank.fsync: expected true, false or milliseconds (above 0, at most 31536000000)",
    ),
    (
        {"#startup": [["=route+r"]], "=route+r": {"offer_ms": float("inf")}},
        "=route+r: offer_ms must be a number of ms from above 0 to 31536000000, not inf",
    ),
    (
        {"#startup": [["=ticket+t"]], "=ticket+t": [1, {}, float("nan")]},
        "=ticket+t: hold_ms must be a positive number up to 31536000000, not nan",
    ),
    # an index directory is used by one process at a time: a second one could never start
    (
        {"#startup": [["=index+a", "=index+b"]], "=index+a": "scores", "=index+b": {"dir": "./scores/"}},
        "#startup[0][1]: =index+b: APP/scores is used by one process at a time, as =index+a at #startup[0][0]",
    ),
    (
        {"#startup": [["=index+rank"], ["=route+r", "=index+rank"]], "=index+rank": "scores"},
        "#startup[1][1]: =index+rank: APP/scores is used by one process at a time, as =index+rank at #startup[0][0]",
    ),
]


def test_index_stages_on_different_directories_or_on_redis_may_share_a_process(app_dir: Path) -> None:
    (app_dir / "elsewhere").symlink_to(app_dir / "scores")
    raw = {
        "#startup": [["=index+a", "=index+b", "=index+c", "=index+d"]],
        "=index+a": "scores",
        "=index+b": "other",
        "=index+c": {"redis": "redis://127.0.0.1:6379/0"},
        "=index+d": {"redis": "redis://127.0.0.1:6379/0"},
    }
    assert len(parse(raw, app_dir).stages) == 4
    with pytest.raises(ConfigError) as caught:
        parse({**raw, "=index+b": "elsewhere"}, app_dir)  # the same directory by another name
    assert str(caught.value).startswith("#startup[0][1]: =index+b: ") and "as =index+a at" in str(caught.value)


@pytest.mark.parametrize(("raw", "message"), BROKEN, ids=[m.split(":")[0] for _, m in BROKEN])
def test_broken_config_gives_one_line_naming_the_path(app_dir: Path, raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(raw, app_dir)
    assert str(caught.value) == message.replace("APP", str(app_dir))
    assert "\n" not in str(caught.value)


def test_an_ssl_admin_endpoint_without_its_certificate_is_a_config_error(app_dir: Path) -> None:
    raw = {"#startup": [["=route+a"]], "#admin": {"console": "ssl:9190:interface=127.0.0.1"}}
    with pytest.raises(
        ConfigError, match=r'^#admin.console: bad endpoint "ssl:9190:interface=127.0.0.1": .*server.pem'
    ):
        parse(raw, app_dir)


def test_a_value_at_the_edge_of_lua_integers_and_an_index_folder_to_create_are_accepted(app_dir: Path) -> None:
    raw = {
        "#startup": [["=index+rank"]],
        "=index+rank": {"dir": "data/scores"},
        "low": -(2**63),
        "high": [2**63 - 1, {"k": "\u00e9"}],
    }
    config = parse(raw, app_dir)
    assert config.values == {"low": -(2**63), "high": [2**63 - 1, {"k": "\u00e9"}]}
    assert not (app_dir / "data").exists()  # the check creates nothing


def test_load_config_resolves_relative_paths_against_the_file(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (app_dir / "stage.json").write_text(json.dumps({"#startup": [["=lua+stage"]], "=lua+stage": LUA_MAIN}))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(str(app_dir / "stage.json"))
    assert config.base_dir == str(app_dir)
    assert config.stages[0].main == str(app_dir / "lua" / "start.lua")


def test_load_config_from_stdin_resolves_against_the_current_directory(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(app_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"#startup": [["=lua+stage"]], "=lua+stage": LUA_MAIN})))
    config = load_config("-")
    assert config.base_dir == str(app_dir)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"#startup": [', "stage.json:1:15: invalid JSON: Expecting value"),
        ("[1, 2]", "stage.json: the configuration must be a JSON object"),
        # json.loads keeps the last of two equal keys: the first would be dropped without a word
        (
            '{"#startup": [["=route+r"]], "#admin": {}, "#admin": {"console": "tcp:0:interface=127.0.0.1"}}',
            'stage.json: invalid JSON: the key "#admin" is written twice in one object',
        ),
        (
            '{"#startup": [["=route+r"]], "=route+r": {"a": 1, "a": 2}}',
            'stage.json: invalid JSON: the key "a" is written twice in one object',
        ),
        ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "stage.json: invalid JSON: nested too deeply"),
    ],
)
def test_load_config_reports_unreadable_json(app_dir: Path, text: str, message: str) -> None:
    path = app_dir / "stage.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{app_dir}/{message}"


def test_load_config_reports_a_missing_file(app_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*missing\.json: cannot read: .*No such file"):
        load_config(str(app_dir / "missing.json"))


def test_default_config_of_the_repository_is_valid() -> None:
    repo = Path(__file__).resolve().parents[2]
    config = load_config(str(repo / "etc" / "stage.json"))
    assert [stage.name for stage in config.stages] == [
        "=index+rank",
        "=route+route",
        "=ticket+ticket",
        "=lua+front",
        "=lua+front",
    ]
    assert config.stages[-1].main == str(repo / "lua" / "front.lua")


def test_cluster_listen_settings(app_dir: Path) -> None:
    raw = {
        "#startup": [["=route+rank"]],
        "#secret": "shared",
        "#cluster": [{"listen": "0.0.0.0:9000", "advertise": "game1.example:9000", "queue": 500}],
    }
    cluster = parse(raw, app_dir).cluster
    assert (cluster.listen, cluster.listen_host, cluster.advertise, cluster.queue) == (
        9000,
        "0.0.0.0",
        "game1.example:9000",
        500,
    )
    plain = parse({"#startup": [["=route+rank"]], "#cluster": [9000]}, app_dir).cluster
    assert (plain.listen, plain.listen_host, plain.advertise, plain.queue) == (9000, "127.0.0.1", None, 10_000)


@pytest.mark.parametrize(
    "settings, error",
    [
        ({"redis": "http://127.0.0.1/0"}, "=index+rank.redis: 'http://127.0.0.1/0': the scheme must be one of"),
        ({"redis": "redis://127.0.0.1:99999/0"}, "=index+rank.redis: 'redis://127.0.0.1:99999/0': port 99999 out of"),
        ({"redis": "redis://127.0.0.1/db"}, "=index+rank.redis: 'redis://127.0.0.1/db': the path is the database"),
        ({"redis": "redis+sentinel://127.0.0.1:26379"}, "=index+rank.redis: 'redis+sentinel://127.0.0.1:26379': name"),
        ({"redis": 5}, "=index+rank.redis: expected a URL string"),
        ({"redis": "redis://h/0", "pool": 0}, "=index+rank.pool: expected a number of connections"),
        ({"redis": "redis://h/0", "wait": -1}, "=index+rank.wait: expected a number of replicas"),
        ({"redis": "redis://h/0", "prefix": 1}, "=index+rank.prefix: expected a string"),
        ({"redis": "redis://h/0", "dir": "x"}, "=index+rank: unknown settings ['dir']"),
        ({"redis": "redis://h/0", "ca": "ca.pem"}, "=index+rank.ca: only for rediss:// URLs"),
    ],
)
def test_redis_index_settings_are_checked_before_anything_starts(app_dir: Path, settings: Any, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse({"#startup": [["=index+rank"]], "=index+rank": settings}, app_dir)
    assert str(raised.value).startswith(error)


def test_a_redis_index_accepts_direct_tls_and_sentinel_urls(app_dir: Path) -> None:
    for url in ("redis://:pw@127.0.0.1:6380/2", "rediss://cache.example:6379/0", "redis+sentinel://a:1,b:2/main/1"):
        config = parse({"#startup": [["=index+rank"]], "=index+rank": {"redis": url, "wait": 1}}, app_dir)
        assert config.stages[0].settings["redis"] == url
