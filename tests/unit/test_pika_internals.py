"""The fast path's reach into pika's private names is checked, so a pika release that renames one
fails here loudly (the transport would otherwise fall back to pika's slower path in silence)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import workerkit
from workerkit.transport import _pika_internals


def test_every_private_pika_name_the_fast_path_uses_exists() -> None:
    assert _pika_internals.check() == []


def test_check_notices_a_renamed_private_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from pika.adapters.asyncio_connection import AsyncioConnection

    # As if a pika release renamed them: the names the module asks for are no longer there.
    monkeypatch.setitem(_pika_internals._PRIVATE, AsyncioConnection, ("_output_frames_v2",))
    monkeypatch.setitem(_pika_internals._PRIVATE_INSTANCE, AsyncioConnection, ("_body_max",))
    assert set(_pika_internals.check()) == {
        "AsyncioConnection._output_frames_v2",
        "AsyncioConnection._body_max",
    }


def _private_attributes(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and isinstance(node.value, ast.Attribute | ast.Name)
        and getattr(node.value, "attr", getattr(node.value, "id", "")) in ("_raw", "raw")
    }


def test_pika_is_imported_only_under_the_transport_and_privately_only_in_one_module() -> None:
    root = Path(workerkit.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        imports_pika = "import pika" in text or "from pika" in text
        if imports_pika:
            assert path.parent.name == "transport", path
        if path.name != "_pika_internals.py":
            assert "_output_marshaled_frames" not in text, path
            assert "_body_max_length" not in text, path
            assert "_AsyncPlaintextTransport" not in text, path
            assert ".callbacks.remove" not in text, path
            assert not _private_attributes(path) - {"_raw", "_wk_publish"}, path


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_transport_seam_does_not_depend_on_workers_or_topology() -> None:
    root = Path(workerkit.__file__).parent / "transport"
    for name in ("base.py", "specs.py", "pika_asyncio.py", "memory.py", "_pika_internals.py"):
        imported = _imports(root / name)
        assert not {"..worker", "..topology", "..consumer", "..runner"} & imported, name


def test_the_default_transport_is_chosen_in_one_place() -> None:
    root = Path(workerkit.__file__).parent
    naming = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "PikaTransport" in path.read_text()
    }
    assert naming == {"transport/__init__.py", "transport/pika_asyncio.py"}


def test_a_connection_missing_a_name_falls_back_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Renamed:  # a connection of a pika release that renamed its receive buffer
        bytes_received = frames_received = bytes_sent = frames_sent = 0
        _body_max_length = 0
        _transport = None

    with caplog.at_level("WARNING", logger="workerkit.transport"):
        assert _pika_internals._fast_path_chosen(Renamed()) is False
    assert "AsyncioConnection._frame_buffer" in caplog.text
    assert "slower" in caplog.text


def test_the_fast_path_names_are_among_those_checked() -> None:
    from pika.adapters.asyncio_connection import AsyncioConnection

    checked = {
        *_pika_internals._PRIVATE[AsyncioConnection],
        *_pika_internals._PRIVATE_INSTANCE[AsyncioConnection],
    }
    assert {"_on_data_available", "_process_frame", "_frame_buffer", "bytes_received"} <= checked


def _pika_private_names() -> set[str]:
    names = {
        name
        for table in (_pika_internals._PRIVATE, _pika_internals._PRIVATE_INSTANCE)
        for owned in table.values()
        for name in owned
    }
    return {name for name in names if name.startswith("_")}


def test_benchmarks_and_tests_reach_pika_privately_only_through_the_one_module() -> None:
    # Attributes of self are a class's own (the Publisher has its own _transport).
    private = _pika_private_names()
    repo = Path(workerkit.__file__).parent.parent
    found: list[str] = []
    for folder in ("workerkit", "benchmarks", "tests", "workers", "scripts"):
        for path in (repo / folder).rglob("*.py"):
            if path.name in ("_pika_internals.py", Path(__file__).name):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                ):
                    found.append(f"{path.relative_to(repo)}:{node.lineno} .{node.attr}")
    assert len(private) >= 8  # the table is read, not empty
    assert found == []
