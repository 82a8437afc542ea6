"""The chaos soak: a seeded random schedule of faults while mixed handlers and publishers run.

For ``--chaos-seconds`` (default 90) four worker processes (async and sync handlers, quorum and
classic queues, two of them behind the fault proxy) consume what four publishers (sync and async,
two of them behind the proxy) send, while the schedule of ``chaos.schedule`` kills workers with
-9 (and restarts them), closes every connection, resets and stalls the proxy, stops and starts
the node's app and raises and clears a memory alarm. Bodies ask for success, slow or CPU-bound
work, failures then success, failure on every attempt, or a Reject.

Then, after the load stopped and every fault was healed, the oracle (``chaos.judge``) requires:
0 lost, nothing unexpected, every message where its body says it must end (the DLQ copies with
workerkit's headers after all their attempts), duplicates only near faults and within the
in-flight bound, nothing left ready or unacked on the broker, and every worker healthy by its
runner and by ``GET /health``.

Replay a failure with the seed printed at the start and in the failure message:
``pytest tests/reliability/test_chaos.py --chaos-seed=N --chaos-seconds=S``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import random
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chaos
import pytest
from broker import PrivateBroker, version_under_test
from harness import AsyncLoad, Load, WorkerProcess, collect, set_alarm, wait_until
from oracle import RESULTS_ENV, Oracle, drain, read_finished_file
from proxy import Proxy

pytestmark = pytest.mark.reliability

WORKER_SETTINGS = {
    "heartbeat": 2,  # a stall is found in about 7 to 13 s
    "retry_max_attempts": chaos.MAX_ATTEMPTS,
    "retry_delay": 0.3,
    "retry_backoff": 2.0,
    "publish_timeout": 2.0,  # retry and DLQ copies under an alarm time out quickly
    "delivery_limit": 50,  # far above what the faults can cause: innocents never reach it
    "log_format": "json",  # timestamps and message ids in the logs kept on a failure
}
DUMP_ENV = "WORKERKIT_TEST_CHAOS_DUMP"  # a file to write what the soak observed (JSON)
MAX_DRIFT = 240.0  # how late the node's lane may finish (rabbitmqctl takes 1 to 15 s under load)
SETTLE_DEADLINE = 150.0  # after the load: everything finished, dead-lettered, nothing unacked
HEALTH_DEADLINE = 60.0


@dataclass
class Slot:
    """One worker position; kill -9 replaces its process, like a process manager would."""

    name: str
    queue: str  # "a", "s" or "c": the queue key
    proxied: bool
    mode: str
    queue_type: str
    prefetch: int
    concurrency: int
    proc: WorkerProcess | None = None


@dataclass(frozen=True)
class Source:
    """One publisher: an id prefix (letters only), its queue key, the path and the client."""

    prefix: str
    queue: str
    proxied: bool
    client: type[Load]
    rate: float
    threads: int


SLOTS = [
    Slot("async-direct", "a", False, "async", "quorum", prefetch=10, concurrency=5),
    Slot("async-proxied", "a", True, "async", "quorum", prefetch=10, concurrency=5),
    Slot("sync-direct", "s", False, "sync", "quorum", prefetch=8, concurrency=4),
    Slot("classic-proxied", "c", True, "async", "classic", prefetch=10, concurrency=5),
]
SOURCES = [
    Source("pa", "a", False, Load, rate=15, threads=2),
    Source("qa", "a", True, AsyncLoad, rate=10, threads=2),
    Source("ps", "s", True, Load, rate=10, threads=2),
    Source("pc", "c", False, AsyncLoad, rate=10, threads=2),
]


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    seed = request.config.getoption("--chaos-seed", default=None)
    return int(seed) if seed is not None else random.SystemRandom().randrange(1, 10**6)


@pytest.fixture
def chaos_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--chaos-seconds", default=90.0))


@pytest.fixture
def chaos_proxy(fresh_broker: PrivateBroker) -> Iterator[Proxy]:
    p = Proxy("127.0.0.1", fresh_broker.port).start()
    try:
        yield p
    finally:
        p.close()


def capacity(fault: chaos.Fault) -> int:
    """Messages in flight that ``fault`` can duplicate: the prefetch windows of the workers it
    reaches plus one publish per publishing thread it reaches."""
    if fault.kind == chaos.KILL9:
        return SLOTS[fault.target].prefetch
    proxied_only = fault.kind in (chaos.PROXY_RESET, chaos.PROXY_STALL)
    workers = sum(s.prefetch for s in SLOTS if s.proxied or not proxied_only)
    publishers = sum(p.threads for p in SOURCES if p.proxied or not proxied_only)
    return workers + publishers


class Chaos:
    """Carries out a schedule against the node, the proxy and the worker slots."""

    def __init__(
        self,
        broker: PrivateBroker,
        proxy: Proxy,
        slots: list[Slot],
        start_worker: Callable[[Slot], WorkerProcess],
    ) -> None:
        self.slots = slots
        self.broker = broker
        self.proxy = proxy
        self.start_worker = start_worker
        self.windows: list[tuple[float, float, int]] = []
        self.done: list[str] = []
        self._stopped = self._alarm = self._stalled = False

    def run(self, faults: list[chaos.Fault], t0: float, deadline: float) -> None:
        """Carry out the schedule on one thread per lane, so that a slow ``rabbitmqctl`` (1 to
        10 s on a loaded machine) delays only the node's own next fault, never a kill -9 or a
        proxy fault. Within a lane, events run in order, each no earlier than its time."""
        lanes: dict[str, list[tuple[float, int, chaos.Fault]]] = collections.defaultdict(list)
        for fault in faults:
            lane = lane_of(fault.kind)
            lanes[lane].append((fault.at, 1, fault))
            if fault.duration:
                lanes[lane].append((fault.at + fault.duration, 0, fault))
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=self._lane, args=(sorted(events), t0, errors), daemon=True)
            for events in lanes.values()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise AssertionError("the fault schedule did not finish in time")
        if errors:
            raise errors[0]

    def _lane(
        self, events: list[tuple[float, int, chaos.Fault]], t0: float, errors: list[BaseException]
    ) -> None:
        started: dict[chaos.Fault, float] = {}
        try:
            for at, begins, fault in events:
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if begins:
                    started[fault] = time.time()
                    self._begin(fault)
                    if not fault.duration:
                        self.windows.append((started[fault], time.time(), fault.copies))
                else:
                    self._end(fault)
                    self.windows.append((started[fault], time.time(), fault.copies))
                took = time.monotonic() - t0 - at
                what = "start" if begins else "end"
                self.done.append(f"{what} {fault.describe()} (done {took:.1f}s after its time)")
        except BaseException as exc:
            errors.append(exc)

    def _begin(self, fault: chaos.Fault) -> None:
        if fault.kind == chaos.KILL9:
            slot = self.slots[fault.target]
            assert slot.proc is not None
            slot.proc.kill9()
            slot.proc = self.start_worker(slot)
        elif fault.kind == chaos.CLOSE_ALL:
            self.broker.close_all_connections("chaos soak")
        elif fault.kind == chaos.PROXY_RESET:
            self.proxy.cut()
        elif fault.kind == chaos.PROXY_STALL:
            self._stalled = True
            self.proxy.stall()
        elif fault.kind == chaos.STOP_APP:
            self._stopped = True
            self.broker.stop_app()
        elif fault.kind == chaos.ALARM:
            self._alarm = True
            set_alarm(self.broker, True)

    def _end(self, fault: chaos.Fault) -> None:
        if fault.kind == chaos.PROXY_STALL:
            self.proxy.resume()
            self._stalled = False
        elif fault.kind == chaos.STOP_APP:
            self.broker.start_app()
            self._stopped = False
        elif fault.kind == chaos.ALARM:
            set_alarm(self.broker, False)
            self._alarm = False

    def heal(self) -> None:
        """Undo whatever is still broken (after an error mid-schedule)."""
        if self._stalled:
            self.proxy.resume()
        if self._stopped:
            self.broker.start_app()
        if self._alarm:
            set_alarm(self.broker, False)
        self._stalled = self._stopped = self._alarm = False


def lane_of(kind: str) -> str:
    """Faults on the node share a lane (one rabbitmqctl at a time); so do the proxy's."""
    if kind in (chaos.CLOSE_ALL, chaos.STOP_APP, chaos.ALARM):
        return "node"
    if kind in (chaos.PROXY_RESET, chaos.PROXY_STALL):
        return "proxy"
    return "workers"


def queue_depths(broker: PrivateBroker) -> dict[str, tuple[int, int]]:
    """Every queue on the node: (ready, unacked)."""
    result = broker.ctl(
        "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
        "messages_unacknowledged", timeout=30,
    )  # fmt: skip
    depths = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            depths[parts[0]] = (int(parts[1]), int(parts[2]))
    return depths


def bodies(seed: int, prefix: str) -> Callable[[int], dict[str, Any]]:
    """The bodies one load source sends: message ids are its prefix and a counter."""
    return lambda n: chaos.body(seed, f"{prefix}{n}")


def read_runs(path: Path) -> dict[str, list[tuple[int, str, float]]]:
    runs: dict[str, list[tuple[int, str, float]]] = collections.defaultdict(list)
    for line in read_finished_file(path):
        mid, attempt, verdict, at = line.split()
        runs[mid].append((int(attempt), verdict, float(at)))
    return runs


def test_schedule_is_a_pure_function_of_the_seed() -> None:
    """The replay promise: same seed and length, same faults and bodies; another seed differs."""
    one = chaos.schedule(1234, 90, len(SLOTS))
    assert one == chaos.schedule(1234, 90.0, len(SLOTS))  # the option is a float
    assert one != chaos.schedule(1235, 90, len(SLOTS))
    assert {f.kind for f in one} == set(chaos.KINDS), "a 90 s soak has every kind of fault"
    assert all(f.at + f.duration <= 90 - chaos.COOLDOWN for f in one)
    for group in ("broker", "stall"):  # these never overlap one another
        spans = sorted((f.at, f.at + f.duration) for f in one if chaos.GROUP.get(f.kind) == group)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    bodies = [chaos.body(1234, f"pa{n}") for n in range(200)]
    assert bodies == [chaos.body(1234, f"pa{n}") for n in range(200)]
    assert {chaos.expected(b) for b in bodies} == {"finished", "exhausted", "rejected"}


def test_the_oracle_can_fail() -> None:
    """Each verdict of ``chaos.judge`` fires on the evidence it is about (no check that cannot
    fail): a lost message, a wrong outcome, bad DLQ headers, a duplicate with no fault near."""
    seed = 1234
    ids = {chaos.expected(chaos.body(seed, f"pa{n}")): f"pa{n}" for n in range(200)}
    ok, failing = ids["finished"], ids["exhausted"]
    good_headers = {
        "workerkit-reason": b"exhausted",
        "workerkit-attempt": chaos.MAX_ATTEMPTS,
        "workerkit-error-type": "__main__.ChaosFailure",
        "workerkit-queue": "q",
    }
    fail_runs = [(attempt, "fail", 10.0 + attempt) for attempt in (1, 2, 3)]

    def observed(**changes: Any) -> chaos.Observed:
        base: dict[str, Any] = {
            "seed": seed,
            "queue_of": {"pa": "q"},
            "attempted_at": {ok: 1.0, failing: 1.0},
            "confirmed": {ok, failing},
            "finished": collections.Counter({ok: 1}),
            "dlq": {failing: [good_headers]},
            "runs": {ok: [(1, "ok", 2.0)], failing: fail_runs},
            "windows": [],
            "capacity": 0,
        }
        return chaos.Observed(**{**base, **changes})

    assert chaos.judge(observed()) == []
    assert "lost" in " ".join(chaos.judge(observed(finished=collections.Counter())))
    assert "should succeed" in " ".join(
        chaos.judge(observed(dlq={ok: [{}], failing: [good_headers]}))
    )
    wrong = {**good_headers, "workerkit-attempt": 2}
    assert "exhausted at attempt 2" in " ".join(chaos.judge(observed(dlq={failing: [wrong]})))
    skipped = {ok: [(1, "ok", 2.0)], failing: fail_runs[:1] + fail_runs[2:]}
    assert "without running attempt(s) [2]" in " ".join(chaos.judge(observed(runs=skipped)))
    twice = collections.Counter({ok: 2})
    assert "0 fault(s) near" in " ".join(chaos.judge(observed(finished=twice)))
    near = observed(finished=twice, windows=[(1.5, 1.6, 1)], capacity=20)
    assert chaos.judge(near) == []  # one fault near: one extra copy is at-least-once
    thrice = collections.Counter({ok: 3})
    worker_side = observed(finished=thrice, windows=[(1.5, 1.6, 1)], capacity=20)
    assert "bound: 1 extra" in " ".join(chaos.judge(worker_side))
    # A node fault between the publish and its confirm, the handler's run and its ack: the
    # publisher sends it again and the broker delivers the first copy again.
    both_sides = observed(finished=thrice, windows=[(1.5, 1.6, 2)], capacity=20)
    assert chaos.judge(both_sides) == []
    assert chaos.judge(observed(finished=thrice, windows=[(1.5, 1.6, 2)], capacity=1)) != []
    assert [chaos.Fault(1.0, kind).copies for kind in chaos.KINDS] == [1, 2, 2, 2, 2, 1]


@pytest.mark.chaos
def test_chaos_soak(
    chaos_seed: int,
    chaos_seconds: float,
    fresh_broker: PrivateBroker,
    chaos_proxy: Proxy,
    workers: Callable[..., WorkerProcess],
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    seed, seconds = chaos_seed, chaos_seconds
    replay = (
        f"chaos seed {seed}: replay with `pytest tests/reliability/test_chaos.py"
        f" --chaos-seed={seed} --chaos-seconds={seconds:g}`"
    )
    print(f"\n{replay}", flush=True)
    faults = chaos.schedule(seed, seconds, len(SLOTS))
    print("schedule:\n  " + "\n  ".join(f.describe() for f in faults), flush=True)
    queues = {key: unique(f"chaos{key}") for key in ("a", "s", "c")}
    direct, proxied = fresh_broker.url, chaos_proxy.url()

    def start_worker(slot: Slot) -> WorkerProcess:
        url = proxied if slot.proxied else direct
        settings = {"prefetch": slot.prefetch, "concurrency": slot.concurrency}
        return workers(
            queues[slot.queue], url, mode=slot.mode, queue_type=slot.queue_type,
            **settings, **WORKER_SETTINGS,
        )  # fmt: skip

    oracle = Oracle(f"chaos_soak[{seed}]")
    slots = [dataclasses.replace(slot) for slot in SLOTS]
    driver = Chaos(fresh_broker, chaos_proxy, slots, start_worker)
    dlq: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    problems: list[str] = []
    try:
        for slot in slots:
            slot.proc = start_worker(slot)
        for slot in slots:
            assert slot.proc is not None
            slot.proc.wait_healthy(60)
        loads = [
            src.client(
                oracle, proxied if src.proxied else direct, queues[src.queue],
                int(src.rate * (seconds + MAX_DRIFT)), rate=src.rate, threads=src.threads,
                prefix=src.prefix, body=bodies(seed, src.prefix),
            ).start()
            for src in SOURCES
        ]  # fmt: skip
        t0 = time.monotonic()
        try:
            driver.run(faults, t0, deadline=t0 + seconds + MAX_DRIFT)
        finally:
            driver.heal()
            for load in loads:
                load.stop()  # the load runs as long as the faults do, however late they ran
        for load in loads:
            load.join(timeout=60.0)
            if foreign := load.foreign_errors():
                where = "".join(traceback.format_exception(foreign[0])[-12:])
                problems.append(
                    f"{len(foreign)} non-PublishError(s) escaped {type(load).__name__}.publish"
                    f" ({load.prefix}): {foreign[:3]}\n{where}"
                )
        problems += settle(oracle, fresh_broker, queues, out_dir, dlq)
        problems += check_health(slots)
    except BaseException as exc:
        # Whatever broke mid-soak (a deadline, a rabbitmqctl error) is reported with the seed.
        note = f"{replay}\nfaults carried out:\n  " + "\n  ".join(driver.done)
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(note)
        else:
            print(note, flush=True)
        raise
    observed = chaos.Observed(
        seed=seed,
        queue_of={src.prefix: queues[src.queue] for src in SOURCES},
        attempted_at=dict(oracle.attempted_at),
        confirmed=set(oracle.confirmed),
        finished=collections.Counter(oracle.finished),
        dlq=dict(dlq),
        runs=read_runs(out_dir / "attempts"),
        windows=driver.windows,
        capacity=sum(capacity(f) for f in faults),
        problems=problems,
    )
    if dump := os.environ.get(DUMP_ENV):
        Path(dump).write_text(json.dumps(vars(observed), default=jsonable))
    verdict = chaos.judge(observed)
    summary = summarize(oracle, observed, faults)
    print(summary, flush=True)
    write_row(summary_row(oracle, observed, faults, seed))
    kept = keep_evidence(seed, observed, out_dir) if verdict else ""
    if verdict and version_under_test() == "3.10":
        xfail_if_only_the_310_delay_loss(verdict, observed, faults, replay)
    assert not verdict, (
        f"{replay}\n{summary}\n{kept}faults carried out:\n  "
        + "\n  ".join(driver.done)
        + f"\n{len(verdict)} problem(s):\n  "
        + "\n  ".join(verdict[:40])
    )


def xfail_if_only_the_310_delay_loss(
    verdict: list[str], observed: chaos.Observed, faults: list[chaos.Fault], replay: str
) -> None:
    """RabbitMQ 3.10 only (docs/brokers.md): retry copies confirmed around a ``stop_app`` can
    vanish from the delay layout (quorum TTL queues dead-lettering at-least-once, new in 3.10;
    not seen on 4.0 or 4.3, where this soak passes). An xfail only when that is all that went
    wrong: a stop_app ran, every lost message's last handler run failed (its retry copy was in
    the delay layout), nothing waits on the node, and there is no other problem."""
    lost = sorted(observed.confirmed - set(observed.finished) - set(observed.dlq))
    others = [
        p
        for p in verdict
        if not p.startswith(f"{len(lost)} confirmed message(s) lost")
        and not p.endswith("(ready, unacked) {}")
    ]
    retry_copies = all(
        observed.runs.get(mid) and observed.runs[mid][-1][1] == "fail" for mid in lost
    )
    stopped = any(fault.kind == "stop_app" for fault in faults)
    if lost and not others and retry_copies and stopped:
        pytest.xfail(
            f"RabbitMQ 3.10 delay-layout loss across stop_app: {len(lost)} retry copies {lost[:10]}"
            f" (docs/brokers.md); {replay}"
        )


def settle(
    oracle: Oracle,
    broker: PrivateBroker,
    queues: dict[str, str],
    out_dir: Path,
    dlq: dict[str, list[dict[str, Any]]],
) -> list[str]:
    """Wait (deadline) until every confirmed message is accounted for and every queue on the
    node is empty with nothing unacked; DLQ copies are drained into ``dlq`` on the way."""
    depths: dict[str, tuple[int, int]] = {}

    def quiet() -> bool:
        nonlocal depths
        for queue in queues.values():
            for mid, headers in drain(broker.url, f"{queue}.dlq"):
                dlq[mid].append(headers)
        collect(oracle, out_dir)
        oracle.dead = set(dlq)
        if oracle.lost:
            return False
        depths = queue_depths(broker)
        return not any(ready or unacked for ready, unacked in depths.values())

    try:
        wait_until(quiet, SETTLE_DEADLINE, "the queues to drain", poll=1.0)
    except AssertionError:
        busy = {q: d for q, d in depths.items() if any(d)}
        return [f"not settled after {SETTLE_DEADLINE:.0f}s: (ready, unacked) {busy}"]
    return []


def check_health(slots: list[Slot]) -> list[str]:
    """Every worker's runner healthy and its ``GET /health`` 200 (within a deadline)."""
    problems = []
    for slot in slots:
        proc = slot.proc
        assert proc is not None
        try:
            wait_until(
                lambda p=proc: p.healthy and p.health_status() == 200,  # type: ignore[misc]
                HEALTH_DEADLINE,
                f"{slot.name} healthy",
                poll=0.5,
            )
        except AssertionError:
            problems.append(
                f"worker {slot.name} not healthy at the end: alive={proc.proc.poll() is None}"
                f" stats={proc.stats()} /health={proc.health_status()}\n{proc.output()[-1500:]}"
            )
    return problems


def summarize(oracle: Oracle, obs: chaos.Observed, faults: list[chaos.Fault]) -> str:
    kinds = collections.Counter(f.kind for f in faults)
    return (
        f"published {len(oracle.attempted)} (confirmed {len(oracle.confirmed)}, unknown"
        f" {len(oracle.unknown)}), finished {len(obs.finished)}, dead-lettered {len(obs.dlq)},"
        f" duplicates {chaos.duplicate_count(obs)} (bound {obs.capacity}), faults"
        f" {len(faults)} {dict(kinds)}"
    )


def summary_row(
    oracle: Oracle, obs: chaos.Observed, faults: list[chaos.Fault], seed: int
) -> dict[str, Any]:
    accounted = set(obs.finished) | set(obs.dlq)
    return {
        "scenario": f"chaos_soak (seed {seed})",
        "attempted": len(oracle.attempted),
        "confirmed": len(oracle.confirmed),
        "unknown": len(oracle.unknown),
        "finished": len(obs.finished),
        "dead_lettered": len(obs.dlq),
        "lost": len(obs.confirmed - accounted),
        "unexpected": len(accounted - set(obs.attempted_at)),
        "duplicates": chaos.duplicate_count(obs),
        "faults": len(faults),
        "recovery_s": [],
    }


def keep_evidence(seed: int, observed: chaos.Observed, out_dir: Path) -> str:
    """Keep the workers' logs and what the soak observed for a failed run (the fixture deletes
    ``out_dir``); returns a line naming where."""
    kept = Path(tempfile.mkdtemp(prefix=f"chaos-seed-{seed}-"))
    shutil.copytree(out_dir, kept / "out", symlinks=True, dirs_exist_ok=True)
    (kept / "observed.json").write_text(json.dumps(vars(observed), default=jsonable))
    return f"worker logs and observations kept in {kept}\n"


def jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def write_row(row: dict[str, Any]) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
