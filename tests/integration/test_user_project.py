"""Acceptance: a fresh project (a worker module and a test file in a temporary directory, no
conftest) runs pytest with only the plugin's fixtures, against the memory broker and against
RabbitMQ, and both pass; a test asserting a wrong outcome fails with a readable message.

The project runs in this interpreter's environment, where workerkit is installed from the
repository (``pip install -e .``): the fixtures reach it only through the installed ``pytest11``
entry point. (A fresh venv with ``pip install <repo>`` takes well over a minute here.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

WORKERS = """
from pydantic import BaseModel

from workerkit import Message, Reject, RetryPolicy, Worker

LEDGER: list[dict] = []


class Payment(BaseModel):
    order_id: int
    cents: int


class Charge(Worker):
    queue = "shop.charge"
    bindings = ("orders.paid",)
    retry = RetryPolicy(max_attempts=3, delay=0.2, jitter=0.0)

    def handle(self, payment: Payment, message: Message) -> None:
        if payment.cents <= 0:
            raise Reject("nothing to charge")
        if payment.order_id == 13 and message.attempt == 1:
            raise ConnectionError("the bank is busy")
        entry = {"order": payment.order_id, "cents": payment.cents, "attempt": message.attempt}
        LEDGER.append(entry)
"""

TESTS = """
import pytest

from shop.workers import LEDGER, Charge


@pytest.fixture(autouse=True)
def empty_ledger():
    LEDGER.clear()


def test_a_paid_order_is_charged_once(workerkit_broker, publisher):
    with workerkit_broker.run(Charge):
        publisher.publish("orders.paid", {"order_id": 1, "cents": 500})
        workerkit_broker.join(raise_errors=True)
    assert LEDGER == [{"order": 1, "cents": 500, "attempt": 1}]


def test_a_busy_bank_is_retried(workerkit_broker, publisher):
    with workerkit_broker.run(Charge):
        publisher.publish("orders.paid", {"order_id": 13, "cents": 700})
        workerkit_broker.join()
    assert LEDGER == [{"order": 13, "cents": 700, "attempt": 2}]
    assert [type(e).__name__ for e in workerkit_broker.errors] == ["ConnectionError"]


def test_nothing_to_charge_is_dead_lettered(workerkit_broker, publisher):
    with workerkit_broker.run(Charge):
        publisher.publish("shop.charge", {"order_id": 2, "cents": 0})
        workerkit_broker.join()
    [dead] = workerkit_broker.dead_letters(Charge)
    assert (dead.reason, dead.error_message) == ("rejected", "nothing to charge")
    assert LEDGER == []
"""

WRONG = """
from shop.workers import LEDGER, Charge


def test_expects_the_wrong_amount(workerkit_broker, publisher):
    with workerkit_broker.run(Charge):
        publisher.publish("orders.paid", {"order_id": 5, "cents": 250})
        workerkit_broker.join(raise_errors=True)
    assert LEDGER == [{"order": 5, "cents": 999, "attempt": 1}]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "workers.py").write_text(textwrap.dedent(WORKERS))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_shop.py").write_text(textwrap.dedent(TESTS))
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "test_wrong.py").write_text(textwrap.dedent(WRONG))
    # Its own rootdir and ini: nothing of workerkit's own test configuration applies.
    # (A short wait for an unreachable WORKERKIT_TEST_URL keeps the no-broker test quick.)
    (tmp_path / "pytest.ini").write_text("[pytest]\npythonpath = .\nworkerkit_broker_wait = 1\n")
    return tmp_path


def pytest_in(
    project: Path, *args: str, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    if url is not None:
        env["WORKERKIT_TEST_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def test_the_project_passes_on_the_memory_broker(project: Path) -> None:
    done = pytest_in(project, "tests")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_the_project_passes_on_rabbitmq(project: Path, broker_url: str) -> None:
    done = pytest_in(project, "tests", "--workerkit-broker=rabbitmq", url=broker_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_a_wrong_expectation_fails_readably(project: Path, broker_url: str) -> None:
    done = pytest_in(project, "wrong", "--workerkit-broker=both", url=broker_url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 failed" in done.stdout
    # pytest's own assertion diff, pointing at the field that differs
    assert "test_expects_the_wrong_amount[memory]" in done.stdout
    assert "test_expects_the_wrong_amount[rabbitmq]" in done.stdout
    assert "'cents': 250" in done.stdout and "'cents': 999" in done.stdout


def test_no_broker_fails_with_a_clear_message_unless_skips_are_asked(project: Path) -> None:
    nowhere = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1
    failed = pytest_in(project, "tests", "--workerkit-broker=rabbitmq", url=nowhere)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "workerkit: no RabbitMQ for this test" in failed.stdout
    skipped = pytest_in(
        project,
        "tests",
        "--workerkit-broker=rabbitmq",
        "--workerkit-skip-without-broker",
        url=nowhere,
    )
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "3 skipped" in skipped.stdout


def test_refused_credentials_fail_at_once_naming_the_cause(project: Path, broker_url: str) -> None:
    """Waiting cannot fix a wrong password: no wait for workerkit_broker_wait, and no advice to
    set a variable that is set (a new-user check found both)."""
    (project / "pytest.ini").write_text("[pytest]\npythonpath = .\nworkerkit_broker_wait = 60\n")
    wrong = broker_url.replace("guest:guest@", "guest:wrong@")
    assert wrong != broker_url
    began = time.monotonic()
    failed = pytest_in(project, "tests", "--workerkit-broker=rabbitmq", url=wrong)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert time.monotonic() - began < 45, "it waited out workerkit_broker_wait (60 s)"
    assert "refused the connection" in failed.stdout and "Check WORKERKIT_TEST_URL" in failed.stdout
    assert "wrong" not in failed.stdout, "the password must not be shown"
