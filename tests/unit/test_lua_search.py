"""the %package search path of stage.load (positions, "[0]" entries, dotted names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagetx.lua.search import find_script, package_entry, script_relpath


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for relative in ("package/a.lua", "rollback/a.lua", "rollback/b/c.lua", "lib/d.lua", "e.lua"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("return 1\n")
    return tmp_path


ENTRIES = ["package", "rollback", "[0]lib", "[0]"]


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("a", (0, "package/a.lua")),
        ("b.c", (1, "rollback/b/c.lua")),
        ("b/c", (1, "rollback/b/c.lua")),
        ("d", (0, "lib/d.lua")),
        ("e", (0, "e.lua")),
    ],
)
def test_first_entry_holding_the_file_wins_with_its_position(tree: Path, name: str, found: tuple[int, str]) -> None:
    assert find_script(name, ENTRIES, str(tree)) == (found[0], str(tree / found[1]))


def test_fail_over_position_when_the_first_entry_lost_the_file(tree: Path) -> None:
    (tree / "package" / "a.lua").unlink()
    assert find_script("a", ENTRIES, str(tree)) == (1, str(tree / "rollback" / "a.lua"))


def test_absolute_entries_are_used_as_they_are(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert find_script("a", [str(tree / "rollback")], str(elsewhere)) == (
        0,
        str(tree / "rollback" / "a.lua"),
    )


@pytest.mark.parametrize("name", ["missing", "", "a..b", ".a", "..a", "b.", "/etc/passwd"])
def test_missing_or_invalid_names_are_not_found(tree: Path, name: str) -> None:
    assert find_script(name, ENTRIES, str(tree)) is None


def test_a_directory_is_not_a_script(tree: Path) -> None:
    (tree / "package" / "b.lua").mkdir()
    assert find_script("b.c", ENTRIES, str(tree)) == (1, str(tree / "rollback" / "b" / "c.lua"))


def test_entry_positions() -> None:
    assert package_entry("dir", 3) == (3, "dir")
    assert package_entry("[0]dir", 3) == (0, "dir")
    assert package_entry("[0]", 2) == (0, "")
    assert package_entry("[2]x", 0) == (2, "x")
    assert script_relpath("a.b.c") == "a/b/c.lua"
