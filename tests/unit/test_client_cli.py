"""The client's command-line options (stagetx.client.cli), parsed without a server."""

from __future__ import annotations

import pytest

from stagetx.client.cli import load_parser, main, main_parser


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "x"])
def test_a_timeout_that_is_not_a_finite_positive_number_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to reach the connection and read as 'cannot connect (is the server running?)'."""
    with pytest.raises(SystemExit) as exit:
        main_parser().parse_args(["--timeout", value, "login a"])
    assert exit.value.code == 2
    assert f"argument --timeout: a finite number of seconds above 0, not {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, text",
    [
        ("--seconds", "nan", "a finite number of seconds above 0"),
        ("--seconds", "inf", "a finite number of seconds above 0"),
        ("--timeout", "0", "a finite number of seconds above 0"),
        ("--think-ms", "nan", "a finite number, 0 or more"),
        ("--think-ms", "-5", "a finite number, 0 or more"),
    ],
)
def test_load_durations_must_be_finite(option: str, value: str, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--seconds nan`` ran no player and reported that none could connect (exit 2)."""
    with pytest.raises(SystemExit):
        load_parser().parse_args([option, value])
    assert f"argument {option}: {text}, not {value!r}" in capsys.readouterr().err


def test_listen_must_be_finite_and_not_negative(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main_parser().parse_args(["--listen", "inf", "login a"])
    assert "argument --listen: a finite number, 0 or more, not 'inf'" in capsys.readouterr().err


def test_good_durations_parse() -> None:
    args = main_parser().parse_args(["--timeout", "2.5", "--listen", "0", "login a"])
    assert (args.timeout, args.listen) == (2.5, 0.0)
    load = load_parser().parse_args(["--seconds", "3", "--think-ms", "0"])
    assert (load.seconds, load.think_ms) == (3.0, 0.0)


@pytest.mark.parametrize("prefix", ["a.b", "my test", "p" * 30, "é"])
def test_a_load_prefix_that_makes_no_valid_user_name_is_refused_before_connecting(
    prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every login would be refused ('user: 1 to 32 letters …'), retried 20 times per player, and
    the run would end with nothing but a count of login errors."""
    assert main(["--port", "1", "load", "--players", "100", "--prefix", prefix]) == 2
    assert f"load: --prefix {prefix!r}: the players' names {prefix}-0 to {prefix}-99 must be" in capsys.readouterr().out
