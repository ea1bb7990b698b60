"""``stage.load`` in a real server: an edited script is picked up after the re-check period."""

from __future__ import annotations

from pathlib import Path

from tests.support import ServerProcess, write_app

MAIN = """
stage.addtask(50, function()
    log4cxx.info("version", stage.load("settings").version)
    return 100
end)
"""


def test_an_edited_script_is_reloaded_after_the_recheck_period(tmp_path: Path) -> None:
    config = {
        "#startup": [["=lua+a"]],
        "=lua+a": {"%package": ["[0]lua"], "%recheck": [300, 300], "=lua+a": "main"},
    }
    path = write_app(tmp_path, config, {"main": MAIN, "settings": "return {version = 1}"})
    with ServerProcess(path) as server:
        server.wait_for(lambda: len(server.logged("a", "version")) >= 2, 20, "first loads")
        (tmp_path / "lua" / "settings.lua").write_text("return {version = 2, note = 'edited'}")
        server.wait_for(lambda: ["2"] in server.logged("a", "version"), 20, "the edited script")
    versions = [v for (v,) in server.logged("a", "version")]
    first_new = versions.index("2")
    assert set(versions[:first_new]) == {"1"} and set(versions[first_new:]) == {"2"}
