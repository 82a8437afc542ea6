"""The README's "Testing your workers" example is run as written, on both brokers, with the
pytest configuration docs/testing.md gives and warnings as errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Testing your workers") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the section has no python example"
    return match.group(1)


def config_from_testing_md() -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    match = re.search(r"```toml\n(# pyproject.toml\n.*?)```", text, re.DOTALL)
    assert match, "docs/testing.md shows no pyproject.toml block"
    return match.group(1)


def test_the_readme_example_passes_on_both_brokers(tmp_path: Path, broker_url: str) -> None:
    (tmp_path / "test_readme_example.py").write_text(readme_example())
    (tmp_path / "pyproject.toml").write_text(config_from_testing_md())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    env.update(WORKERKIT_TEST_URL=broker_url, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "--workerkit-broker=both",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout
