"""The import rules of docs/internals.md (Architecture) as ``make check`` runs them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
assert spec is not None and spec.loader is not None
check_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_imports)


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"stagetx/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_project_keeps_its_import_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_imports.main(ROOT) == 0, capsys.readouterr().out


def test_a_forbidden_import_and_a_cycle_are_each_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tree(
        tmp_path,
        {
            "stagetx/codec.py": "from stagetx.router import Router\n",
            "stagetx/router.py": "",
            "stagetx/address.py": "import stagetx.message\n",
            "stagetx/message.py": "from stagetx.address import parse_target\n",
            "stagetx/lua/runtime.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import stagetx.child\n",
            "stagetx/child/__init__.py": "",
        },
    )
    assert check_imports.main(root) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{root}/stagetx/codec.py: codec may not import stagetx.router (router)",
        "import cycle: stagetx.address -> stagetx.message -> stagetx.address",
    ]
