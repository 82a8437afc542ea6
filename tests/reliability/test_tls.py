"""TLS: amqps with certificate verification against a test CA made here with openssl.

The server certificate names ``localhost`` only, so ``amqps://...@localhost`` verifies and
``amqps://...@127.0.0.1`` (the same listener under a name the certificate does not carry) must
fail; a client trusting another CA must fail too. Failing never falls back to plain AMQP: the
broker sees no connection from the failed clients at all.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker import PrivateBroker, TlsFiles
from harness import EXCHANGE, Load, WorkerProcess, settle, wait_until
from oracle import Oracle

import workerkit

pytestmark = pytest.mark.reliability


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder)  # fmt: skip


def make_server_cert(folder: Path) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem",
            cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="wkr-tls-"))
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_server_cert(folder)
    folder.chmod(0o755)
    for path in [folder, *folder.iterdir()]:
        shutil.chown(path, "rabbitmq", "rabbitmq")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_broker(certs: Path) -> Iterator[PrivateBroker]:
    tls = TlsFiles(
        ca=str(certs / "ca.pem"), cert=str(certs / "server.pem"), key=str(certs / "server.key")
    )
    broker = PrivateBroker(tls=tls)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def tls_url(broker: PrivateBroker, host: str) -> str:
    return f"amqps://guest:guest@{host}:{broker.tls_port}/"


def connections(broker: PrivateBroker) -> list[str]:
    """'<ssl> <name>' for every client connection the broker has."""
    result = broker.ctl("list_connections", "-q", "--no-table-headers", "ssl", "client_properties")
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_tls_with_verification_delivers_everything(
    tls_broker: PrivateBroker,
    certs: Path,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue = unique("tls")
    url = tls_url(tls_broker, "localhost")
    ca = str(certs / "ca.pem")
    worker = workers(queue, url, tls_ca_file=ca)
    worker.wait_healthy()
    seen = connections(tls_broker)
    assert seen and all(line.startswith("true") for line in seen), seen
    load = Load(oracle, url, queue, 200, rate=1000, tls_ca_file=ca).start()
    load.join()
    settle(oracle, tls_broker.url, queue, out_dir)
    oracle.read_dlq(tls_broker.url, queue)
    oracle.check(max_duplicates=0)


@pytest.mark.parametrize(
    ("host", "ca_name"), [("127.0.0.1", "ca.pem"), ("localhost", "other-ca.pem")]
)
def test_tls_failure_is_fatal_and_never_falls_back_to_plain(
    tls_broker: PrivateBroker, certs: Path, host: str, ca_name: str
) -> None:
    before = len(connections(tls_broker))
    settings = workerkit.Settings(
        url=tls_url(tls_broker, host),
        exchange=EXCHANGE,
        tls_ca_file=str(certs / ca_name),
        publish_timeout=3.0,
        connect_timeout=2.0,
    )
    publisher = workerkit.Publisher(settings=settings)
    try:
        with pytest.raises(workerkit.WorkerkitError) as info:
            publisher.publish("anything", {"n": 1})
    finally:
        publisher.close()
    assert "certificate" in str(info.value).lower() or "TLS" in str(info.value), info.value
    wait_until(lambda: len(connections(tls_broker)) <= before, 10, "no new broker connections")


def test_worker_with_unverifiable_certificate_stops(
    tls_broker: PrivateBroker,
    certs: Path,
    workers: Callable[..., WorkerProcess],
    unique: Callable[[str], str],
) -> None:
    url = tls_url(tls_broker, "127.0.0.1")  # not a name in the certificate
    worker = workers(unique("tlsbad"), url, tls_ca_file=str(certs / "ca.pem"))
    wait_until(lambda: worker.proc.poll() is not None, 15, "the worker to give up")
    assert worker.proc.returncode != 0
    assert "certificate verify failed" in worker.output()
