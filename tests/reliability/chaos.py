"""The pure half of the chaos soak: the fault schedule, the message mix and the verdict.

Everything here is a function of the seed (and the soak's length), so a failing run is replayed
exactly by passing the same ``--chaos-seed`` and ``--chaos-seconds``: the same faults at the same
offsets with the same durations and targets, the same bodies for the same message ids. What a
replay cannot repeat is the scheduler's timing inside the broker and the workers.

The verdict (``judge``) is what the soak asserts, collected as a list of plain-English problems:

* **lost**: a confirmed publish that was neither finished by a handler nor dead-lettered;
* **unexpected**: an id finished or dead-lettered that nobody tried to publish;
* **wrong outcome**: a message whose body asks to succeed (at once or after some failed
  attempts) that reached the DLQ, or one that always fails / rejects that a handler finished,
  or a DLQ copy without workerkit's headers (reason, attempt, error type, queue), or a retry
  ladder with a missing attempt;
* **duplicates** beyond at-least-once: a fault can make one extra copy of a message it catches
  in flight on each side it reaches: a redelivery of an unacked delivery (it reaches the
  message's worker) and a re-sent publish whose confirm was lost (it reaches its publisher). A
  node or proxy fault can do both to a message consumed before its confirm came back; a kill -9
  reaches one worker, and an alarm counts once however long it lasts. So a message may be
  handled (or dead-lettered) once more per side of each fault near its life and no more; and
  all extra copies together stay within the messages in flight at the faults (``capacity``). A
  copy per retry cycle under an alarm (a retry copy whose publish timed out is still delivered
  later, while the nacked original makes another) breaks the first bound.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Any

# Fault kinds. "broker" faults act on the whole node and never overlap one another (rabbitmqctl
# cannot close connections or raise an alarm while the app is stopped); a stall never overlaps
# another stall; kill -9 and proxy resets land anywhere, also inside the others.
KILL9 = "kill9"
CLOSE_ALL = "close_all_connections"
PROXY_RESET = "proxy_reset"
PROXY_STALL = "proxy_stall"
STOP_APP = "stop_app"
ALARM = "memory_alarm"
KINDS = (KILL9, CLOSE_ALL, PROXY_RESET, PROXY_STALL, STOP_APP, ALARM)
WEIGHTS = (3.0, 2.0, 2.0, 1.5, 1.0, 1.0)
GROUP = {CLOSE_ALL: "broker", STOP_APP: "broker", ALARM: "broker", PROXY_STALL: "stall"}
DURATION = {PROXY_STALL: (2.0, 12.0), STOP_APP: (1.0, 5.0), ALARM: (2.0, 8.0)}
GAP = (2.0, 7.0)  # seconds between the starts of two faults
WARMUP = 3.0  # seconds of calm load before the first fault
COOLDOWN = 5.0  # every fault has ended this long before the soak's end

# Seconds after a fault's window (from the start of its action to the end of its healing) during
# which it may still cause a duplicate: a stalled connection is given up after a missed
# heartbeat, reconnects back off up to 1 s, blocked publishes go out once an alarm clears.
FAULT_SLACK = 10.0


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the soak started
    kind: str
    duration: float = 0.0  # for stall, stop_app and alarm
    target: int = 0  # worker index, for kill9

    @property
    def copies(self) -> int:
        """Extra copies this fault can make of one message it catches in flight: a redelivery,
        and a re-sent publish where it reaches the publishers too (the soak's proxy carries
        publishers and workers alike)."""
        return 1 if self.kind in (KILL9, ALARM) else 2

    def describe(self) -> str:
        extra = f" for {self.duration:.1f}s" if self.duration else ""
        who = f" worker #{self.target}" if self.kind == KILL9 else ""
        return f"t+{self.at:.1f}s {self.kind}{who}{extra}"


def schedule(seed: int, seconds: float, workers: int) -> list[Fault]:
    """The faults of one soak: every kind once in a shuffled order first (when they fit), then
    random kinds by weight, until ``seconds - COOLDOWN``."""
    rng = random.Random(f"chaos-schedule:{seed}:{float(seconds)}:{workers}")
    first = list(KINDS)
    rng.shuffle(first)
    free_at: dict[str, float] = {}
    faults: list[Fault] = []
    t = WARMUP
    while True:
        kind = first.pop(0) if first else rng.choices(KINDS, WEIGHTS)[0]
        low, high = DURATION.get(kind, (0.0, 0.0))
        duration = round(rng.uniform(low, high), 1) if high else 0.0
        target = rng.randrange(workers) if kind == KILL9 else 0
        start = max(t, free_at.get(GROUP.get(kind, ""), 0.0))
        if start + duration > seconds - COOLDOWN:
            return faults
        faults.append(Fault(round(start, 1), kind, duration, target))
        if kind in GROUP:
            free_at[GROUP[kind]] = start + duration + 1.0
        t = start + rng.uniform(*GAP)


# -- the message mix ---------------------------------------------------------------------------

MAX_ATTEMPTS = 3  # the workers' retry_max_attempts
ALWAYS = 99  # "fail": more attempts than any ladder has


def body(seed: int, message_id: str) -> dict[str, Any]:
    """The body of one message: ok, slow, CPU-bound, flaky (fails then succeeds), failing (always)
    or rejected. A pure function of the seed and the id."""
    rng = random.Random(f"chaos-body:{seed}:{message_id}")
    n = int("".join(c for c in message_id if c.isdigit()) or 0)
    roll = rng.random()
    if roll < 0.55:
        return {"n": n}
    if roll < 0.70:
        return {"n": n, "sleep": round(rng.uniform(0.05, 0.5), 3)}
    if roll < 0.75:
        return {"n": n, "cpu": 0.02}
    if roll < 0.85:
        return {"n": n, "fail": rng.choice([1, 2]), "sleep": 0.01}
    if roll < 0.95:
        return {"n": n, "fail": ALWAYS}
    return {"n": n, "reject": True}


def expected(job: dict[str, Any]) -> str:
    """``finished``, ``exhausted`` or ``rejected``: where the message must end."""
    if job.get("reject"):
        return "rejected"
    if job.get("fail", 0) >= MAX_ATTEMPTS:
        return "exhausted"
    return "finished"


# -- the verdict -------------------------------------------------------------------------------


@dataclass
class Observed:
    """What the soak saw, gathered by the test."""

    seed: int
    queue_of: dict[str, str]  # message id prefix -> queue
    attempted_at: dict[str, float]  # id -> wall time of its publish attempt
    confirmed: set[str]
    finished: collections.Counter[str]
    dlq: dict[str, list[dict[str, Any]]]  # id -> headers of each DLQ copy
    runs: dict[str, list[tuple[int, str, float]]]  # id -> (attempt, verdict, time) per run
    # wall time (start, end) of each fault executed, and the extra copies it can make of one
    # message (Fault.copies)
    windows: list[tuple[float, float, int]]
    capacity: int  # total in-flight messages the executed faults could duplicate
    problems: list[str] = field(default_factory=list)


def text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def judge(obs: Observed) -> list[str]:
    """Every problem the oracle finds; empty means the soak passed."""
    problems = list(obs.problems)
    attempted = set(obs.attempted_at)
    accounted = set(obs.finished) | set(obs.dlq)
    lost = sorted(obs.confirmed - accounted)
    if lost:
        problems.append(f"{len(lost)} confirmed message(s) lost: {lost[:10]}")
    unexpected = sorted(accounted - attempted)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected id(s): {unexpected[:10]}")
    problems += _outcomes(obs, accounted & attempted)
    problems += _duplicates(obs)
    return problems


def _outcomes(obs: Observed, ids: set[str]) -> list[str]:
    wrong: list[str] = []
    for mid in sorted(ids):
        want = expected(body(obs.seed, mid))
        queue = obs.queue_of[mid.rstrip("0123456789")]
        if want == "finished":
            if mid in obs.dlq:
                reasons = [text(h.get("workerkit-reason")) for h in obs.dlq[mid]]
                wrong.append(f"{mid} should succeed but was dead-lettered ({reasons})")
            continue
        if mid in obs.finished:
            wrong.append(f"{mid} should end as {want} but a handler finished it")
        if mid not in obs.dlq:
            continue  # an unknown publish that never landed; lost confirmed ones are above
        for headers in obs.dlq[mid]:
            wrong += _dlq_headers(mid, want, queue, headers)
        if want == "exhausted":
            seen = {attempt for attempt, verdict, _ in obs.runs.get(mid, []) if verdict == "fail"}
            missing = set(range(1, MAX_ATTEMPTS + 1)) - seen
            if missing:
                wrong.append(f"{mid} dead-lettered without running attempt(s) {sorted(missing)}")
    return wrong


def _dlq_headers(mid: str, want: str, queue: str, headers: dict[str, Any]) -> list[str]:
    got = {k: text(v) for k, v in headers.items() if str(text(k)).startswith("workerkit-")}
    problems = []
    if got.get("workerkit-reason") != want:
        problems.append(f"{mid} in the DLQ with reason {got.get('workerkit-reason')!r}, not {want}")
    if got.get("workerkit-queue") != queue:
        problems.append(f"{mid} DLQ copy names queue {got.get('workerkit-queue')!r}")
    if want == "exhausted":
        if got.get("workerkit-attempt") != MAX_ATTEMPTS:
            problems.append(f"{mid} exhausted at attempt {got.get('workerkit-attempt')!r}")
        if not str(got.get("workerkit-error-type", "")).endswith("ChaosFailure"):
            problems.append(f"{mid} DLQ error type {got.get('workerkit-error-type')!r}")
    return problems


def copies(obs: Observed, mid: str) -> int:
    return obs.finished.get(mid, 0) + len(obs.dlq.get(mid, []))


def faults_near(obs: Observed, mid: str) -> tuple[int, int]:
    """The faults whose window (plus FAULT_SLACK) overlaps the message's life, from its publish
    attempt to its last handler run, and the extra copies of it they can make together."""
    born = obs.attempted_at.get(mid, 0.0)
    times = [t for _, _, t in obs.runs.get(mid, [])]
    died = max(times, default=born)
    near = [n for start, end, n in obs.windows if start <= died and born <= end + FAULT_SLACK]
    return len(near), sum(near)


def _duplicates(obs: Observed) -> list[str]:
    problems = []
    extra_total = 0
    for mid in sorted(set(obs.finished) | set(obs.dlq)):
        extra = copies(obs, mid) - 1
        if extra <= 0:
            continue
        extra_total += extra
        near, bound = faults_near(obs, mid)
        if extra > bound:
            runs = collections.Counter(attempt for attempt, _, _ in obs.runs.get(mid, []))
            problems.append(
                f"{mid} handled or dead-lettered {copies(obs, mid)} times with {near} fault(s)"
                f" near its life (bound: {bound} extra); runs per attempt {dict(runs)}"
            )
    if extra_total > obs.capacity:
        problems.append(f"{extra_total} duplicates in all > in-flight bound {obs.capacity}")
    return problems


def duplicate_count(obs: Observed) -> int:
    return sum(max(0, copies(obs, mid) - 1) for mid in set(obs.finished) | set(obs.dlq))
