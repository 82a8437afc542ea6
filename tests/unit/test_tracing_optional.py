"""Tracing is optional: nothing in workerkit imports opentelemetry unless workerkit.tracing is
imported, and without the extra that import fails with the command that fixes it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import workerkit

# Every workerkit module but the one that is the optional extra: a module added later is covered.
MODULES = [
    "workerkit",
    *sorted(
        info.name
        for info in pkgutil.walk_packages(workerkit.__path__, "workerkit.")
        if info.name != "workerkit.tracing"
    ),
]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_nothing_but_workerkit_tracing_imports_opentelemetry() -> None:
    result = _run(
        f"""
        import importlib, sys
        for name in {MODULES!r}:
            importlib.import_module(name)
        from workerkit.cli import cli
        from click.testing import CliRunner
        CliRunner().invoke(cli, ["run", "--help"])
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(loaded)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_the_extra_the_import_error_names_it() -> None:
    result = _run(
        """
        import sys
        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"No module named {name!r}")
        sys.meta_path.insert(0, NoOtel())
        try:
            import workerkit.tracing
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'workerkit[otel]'" in result.stdout
