"""PostgreSQL away under load: frozen (SIGSTOP) for a while, then shut down and started again.

The scenario needs a server it may break, so it starts a private embedded PostgreSQL (the same binaries as
``.data/postgres``) in a temporary folder: the shared server also serves other people's test runs and
``make run``, and this run only ever signals processes it started.  With ``DATABASE_URL`` set there is no such
server to take down, and the scenario is skipped.

Timeline, under a steady open-loop POST load plus a ``/ready`` probe every 250 ms: normal; **frozen** (SIGSTOP to
the postmaster and every backend: connections hang, nothing errors); thawed; **stopped** (a fast shutdown, as
``pg_ctl stop -m fast``: connections are refused); started again; normal.  What must hold: every answer within
1 s, 503 whenever the database is away, the API and the dispatchers back by themselves, nothing accepted
lost, nothing refused stored, and a clean final state.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.support import http_status
from chaos.harness import HEADERS, MIXED_BODIES, Outcome, Stage, accepted_checks, describe, final_state_checks
from common.database import stop_embedded


@dataclass(frozen=True)
class Timeline:
    """Seconds of each phase."""

    warm: float
    frozen: float
    between: float
    stopped: float
    after: float
    rate: float

    @property
    def total(self) -> float:
        """The whole load duration (restart time aside)."""
        return self.warm + self.frozen + self.between + self.stopped + self.after


FULL = Timeline(warm=4, frozen=10, between=6, stopped=10, after=8, rate=40)
QUICK = Timeline(warm=2, frozen=4, between=3, stopped=4, after=4, rate=30)


class PrivateServer:
    """An embedded PostgreSQL of this run's own, in ``root/pg``."""

    def __init__(self, root: Path) -> None:
        """Nothing starts until :meth:`start`."""
        root.mkdir(parents=True, exist_ok=True)
        self.pgdata = root / "pg"
        self.server: Any = None
        self.frozen: list[int] = []

    def start(self) -> str:
        """initdb and start it; its administrative DSN."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver  # pylint: disable=import-outside-toplevel  # only this scenario needs it

            self.server = pgserver.get_server(self.pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
        return str(self.server.get_uri())

    def postmaster(self) -> int:
        """The postmaster's pid."""
        return int((self.pgdata / "postmaster.pid").read_text(encoding="ascii").split()[0])

    def backends(self, parent: int) -> list[int]:
        """Every process whose parent is ``parent`` (PostgreSQL's children each lead a process group of their
        own, so a process-group signal would miss them)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
                if int(stat[1]) == parent:
                    found.append(int(entry.name))
        return found

    def freeze(self) -> None:
        """SIGSTOP the postmaster first (so it forks no more), then all its children."""
        parent = self.postmaster()
        os.kill(parent, signal.SIGSTOP)
        self.frozen = [parent]
        for _ in range(2):  # a child forked just before the postmaster stopped shows up on the second pass
            for pid in self.backends(parent):
                if pid not in self.frozen:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        self.frozen.append(pid)

    def thaw(self) -> None:
        """SIGCONT everything :meth:`freeze` stopped, children first."""
        for pid in reversed(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster), waiting for it to finish."""
        stop_embedded(self.pgdata)

    def restart(self) -> None:
        """Start it again on the same socket."""
        self.server.ensure_postgres_running()

    def destroy(self) -> None:
        """Thaw, stop, delete."""
        self.thaw()
        if (self.pgdata / "postmaster.pid").exists():
            stop_embedded(self.pgdata)
        shutil.rmtree(self.pgdata.parent, ignore_errors=True)


class Prober(threading.Thread):
    """GET /ready every 250 ms until stopped; (wall time, status, seconds) per probe."""

    def __init__(self, url: str) -> None:
        """Probe ``url``."""
        super().__init__(daemon=True)
        self.url = url
        self.results: list[tuple[float, int, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        """Probe until :attr:`halt` is set."""
        while not self.halt.is_set():
            wall, started = time.time(), time.monotonic()
            status = http_status(self.url, timeout=5.0)
            self.results.append((wall, status, time.monotonic() - started))
            self.halt.wait(0.25)


def run(workdir: Path, *, embedded: bool, quick: bool) -> Outcome:
    """The outage scenario (skipped unless the database is the embedded one)."""
    plan = QUICK if quick else FULL
    outcome = Outcome("outage", f"PostgreSQL frozen {plan.frozen:g} s, then stopped {plan.stopped:g} s, under load")
    outcome.notes += describe(__doc__)
    if not embedded:
        outcome.skipped = ("DATABASE_URL points at a server this run did not start and must not stop; unset it to "
                           "run against a private embedded PostgreSQL")
        return outcome
    private = PrivateServer(workdir / "outage-server")
    try:
        admin = private.start()
        with Stage(admin, "outage", workdir) as stage:
            _drive(stage, private, plan, outcome)
    finally:
        private.destroy()
    return outcome


def _drive(stage: Stage, private: PrivateServer, plan: Timeline, outcome: Outcome) -> None:
    """Run the timeline and check what happened."""
    api, url = stage.api()
    dispatchers = [stage.dispatcher(f"dispatcher-{i}", wait=True) for i in range(2)]
    prober = Prober(url + "/ready")
    load = stage.load("outage", base_url=url, method="POST", paths=["/api/v1/messages"], headers=HEADERS,
                      bodies=MIXED_BODIES, rate=plan.rate, duration=plan.total + 3, concurrency=256, timeout=5.0)
    prober.start()
    marks: dict[str, float] = {}
    try:
        time.sleep(plan.warm)
        marks["freeze"] = time.time()
        private.freeze()
        time.sleep(plan.frozen)
        private.thaw()
        marks["thaw"] = time.time()
        time.sleep(plan.between)
        marks["stop"] = time.time()
        private.stop()
        time.sleep(plan.stopped)
        marks["restart"] = time.time()
        private.restart()
        marks["up"] = time.time()
        time.sleep(plan.after)
    finally:
        private.thaw()
        summary, records = load.result()
        prober.halt.set()
        prober.join(10)
    finished = stage.wait_finished(60)
    alive = [d.alive() for d in dispatchers] + [api.alive()]
    codes = [d.stop() for d in dispatchers]
    _timing_checks(outcome, records, prober.results, marks)
    outcome.check("the API and both dispatchers survived (still running at the end)", all(alive), str(alive))
    outcome.check("the dispatchers finished everything by themselves afterwards", finished,
                  f"{stage.unfinished()} unfinished" if not finished else "")
    outcome.check("the dispatchers exit 0 on SIGTERM", codes == [0, 0], f"exit codes {codes}")
    accepted_checks(stage, outcome, records)
    final_state_checks(stage, outcome)
    outcome.facts.update({"posts": summary["requests"], "post_outcomes": summary["outcomes"],
                          "restart_seconds": round(marks.get("up", 0) - marks.get("restart", 0), 2),
                          "dispatcher_outage_log_lines": sum(
                              d.log_text().count("database unavailable") for d in dispatchers)})


def _phase_checks(outcome: Outcome, phase: str, times: tuple[float, float, float], records: list[dict[str, Any]],
                  probes: list[tuple[float, int, float]]) -> None:
    """503 while the database is away (between ``times[0]`` and ``times[1]``), 201 soon after ``times[2]``."""
    start, end, back = times
    inside = [r for r in records if r["t"] > start + 0.05 and r["t"] + r["latency"] < end]
    codes: dict[str, int] = {}
    for r in inside:
        codes[f"{r['status']}:{r['code']}"] = codes.get(f"{r['status']}:{r['code']}", 0) + 1
    outcome.check(f"while {phase}: every POST answered 503", bool(inside) and all(r["status"] == 503 for r in inside),
                  f"{len(inside)} answered: {codes}")
    probes_in = [p for p in probes if start + 0.05 < p[0] and p[0] + p[2] < end]
    outcome.check(f"while {phase}: /ready answered 503", bool(probes_in) and all(p[1] == 503 for p in probes_in),
                  f"{len(probes_in)} probes: {sorted({p[1] for p in probes_in})}")
    first_ok = min((r["t"] + r["latency"] for r in records if r["status"] == 201 and r["t"] >= back), default=None)
    outcome.check(f"after {phase}: POSTs succeed again within 5 s, by themselves",
                  first_ok is not None and first_ok - back < 5.0,
                  f"first 201 {first_ok - back:.2f} s after the database was back" if first_ok else "no 201")
    outcome.facts[f"{phase}_answers"] = codes


def _timing_checks(outcome: Outcome, records: list[dict[str, Any]], probes: list[tuple[float, int, float]],
                   marks: dict[str, float]) -> None:
    """Answers within 1 s, 503 while the database is away, 201 again soon after."""
    slowest = max((r["latency"] for r in records), default=0.0)
    slowest_probe = max((p[2] for p in probes), default=0.0)
    late = [r for r in records if r["latency"] > 1.0] + [p for p in probes if p[2] > 1.0]
    outcome.check("every answer came within 1 s (POSTs and /ready probes)", not late,
                  f"slowest POST {slowest * 1000:.0f} ms, slowest probe {slowest_probe * 1000:.0f} ms"
                  + (f", {len(late)} over 1 s" if late else ""))
    for phase, start, end, back in (("frozen", "freeze", "thaw", "thaw"), ("stopped", "stop", "restart", "up")):
        if start in marks and end in marks and back in marks:
            _phase_checks(outcome, phase, (marks[start], marks[end], marks[back]), records, probes)
    tail = [r for r in records if r["t"] > max(r2["t"] for r2 in records) - 2.0]
    outcome.check("the last 2 s of load: all 201", bool(tail) and all(r["status"] == 201 for r in tail),
                  f"{len(tail)} requests")
