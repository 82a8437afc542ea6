"""README's settings table and config/.env.example are generated from Settings and must stay so."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from workerkit.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FIX = "regenerate with `make settings-table`"


def _script() -> ModuleType:
    path = ROOT / "scripts/settings_table.py"
    spec = importlib.util.spec_from_file_location("settings_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_table() -> str:
    script = _script()
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(script.START), readme.index(script.END)
    return readme[start + len(script.START) : end].strip()


def test_readme_table_lists_every_setting_once() -> None:
    rows = re.findall(r"^\| `(WORKERKIT_[A-Z_]+)` \|", _readme_table(), re.M)
    expected = [f"WORKERKIT_{name.upper()}" for name in Settings.model_fields]
    assert sorted(rows) == sorted(expected), FIX


def test_readme_table_is_what_the_script_prints() -> None:
    assert _readme_table() == _script().markdown_table(), FIX


def test_every_row_says_what_the_setting_means() -> None:
    for row in _script().markdown_table().splitlines()[2:]:
        meaning = row.rstrip("|").rsplit("|", 1)[1].strip()
        assert meaning, f"no meaning for {row.split('|')[1].strip()}"


def test_env_example_is_what_the_script_prints() -> None:
    example = (ROOT / "config/.env.example").read_text()
    assert example == _script().env_file(), FIX
    for name in Settings.model_fields:
        assert f"# WORKERKIT_{name.upper()}=" in example


def test_defaults_in_the_table_are_the_real_defaults() -> None:
    defaults = Settings.model_construct()
    table = _readme_table()
    assert defaults.prefetch is None  # unset: 2 x concurrency (consumer.py)
    assert "| `WORKERKIT_PREFETCH` | int \\| None | `none` |" in table
    assert f"| `WORKERKIT_CONCURRENCY` | int | `{defaults.concurrency}` |" in table
    assert f"| `WORKERKIT_EXCHANGE` | str | `{defaults.exchange}` |" in table
