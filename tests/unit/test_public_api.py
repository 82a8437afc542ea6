"""Guards on the public surface: what ``workerkit`` exports, and where pika may be imported.

Changing the public API is allowed, but it must be a decision: update EXPECTED here together with
DESIGN.md, the README and the docs.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import workerkit

PACKAGE = Path(workerkit.__file__).parent
CLIENT_LIBRARIES = {"pika", "aio_pika", "aiormq", "pamqp"}

EXPECTED = {
    "AccessRefused",
    "AsyncPublisher",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "Message",
    "MessageTooLarge",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "Publisher",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "RetryLater",
    "RetryPolicy",
    "Runner",
    "Settings",
    "TopologyError",
    "InvalidMessage",
    "Unroutable",
    "Worker",
    "WorkerkitError",
    "__version__",
    "run",
}


def test_all_is_exactly_the_expected_set() -> None:
    assert len(workerkit.__all__) == len(set(workerkit.__all__)), "duplicates in __all__"
    assert set(workerkit.__all__) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from workerkit import {name}", namespace)
    assert namespace[name] is getattr(workerkit, name)


def test_nothing_public_is_missing_from_all() -> None:
    public = {
        name
        for name, value in vars(workerkit).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(workerkit.__all__) == set()


def test_exported_objects_belong_to_workerkit() -> None:
    for name in workerkit.__all__:
        value = getattr(workerkit, name)
        module = getattr(value, "__module__", "workerkit")
        assert module.startswith("workerkit"), f"{name} comes from {module}"


def test_error_tree() -> None:
    errors = [
        "AccessRefused",
        "ConfigurationError",
        "ConnectionFailed",
        "DecodeError",
        "InvalidMessage",
        "MessageTooLarge",
        "PublishError",
        "PublishNacked",
        "PublishTimeout",
        "TopologyError",
        "Unroutable",
    ]
    for name in errors:
        assert issubclass(getattr(workerkit, name), workerkit.WorkerkitError), name
    # Bad input is also what Python code expects it to be.
    assert issubclass(workerkit.InvalidMessage, workerkit.PublishError)
    assert issubclass(workerkit.InvalidMessage, ValueError)
    assert issubclass(workerkit.MessageTooLarge, workerkit.InvalidMessage)
    assert issubclass(workerkit.ConfigurationError, ValueError)
    # Control flow raised by handlers is not an error of workerkit's own.
    assert not issubclass(workerkit.Reject, workerkit.WorkerkitError)
    assert not issubclass(workerkit.RetryLater, workerkit.WorkerkitError)


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
    return roots


def test_only_the_transport_package_imports_client_libraries() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10  # the scan really looked at the package
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_imported_roots(path) & CLIENT_LIBRARIES)
        for path in sources
        if "transport" not in path.relative_to(PACKAGE).parts
    }
    assert {name: libs for name, libs in offenders.items() if libs} == {}


def test_the_scan_would_see_an_offending_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom pika.spec import BasicProperties\n"
        "def f():\n    import aio_pika.abc\n    importlib.import_module('aiormq')\n"
    )
    assert _imported_roots(probe) >= {"pika", "aio_pika", "aiormq"}


def test_the_memory_transport_needs_no_client_library() -> None:
    assert _imported_roots(PACKAGE / "transport" / "memory.py") & CLIENT_LIBRARIES == set()


def test_importing_workerkit_does_not_load_a_client_library() -> None:
    # Keeps `import workerkit` (and the CLI's start-up) light; transports load on first use.
    code = (
        "import sys, workerkit, workerkit.testing\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {CLIENT_LIBRARIES!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


def test_docs_design_lists_every_public_name() -> None:
    """docs/design.md's "Public names" is what a reader trusts; it once missed two errors."""
    text = (PACKAGE.parent / "docs/design.md").read_text()
    section = text.split("## Public names", 1)[1].split("Modules meant for direct use", 1)[0]
    listed = set(re.findall(r"`(\w+)`", section))
    assert listed == set(workerkit.__all__)
