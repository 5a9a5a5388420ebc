"""The benchmark steps: the service and the baselines as child processes, the load from :mod:`bench.loadgen`.

Order (each step leaves the tables as it needs them; the API and the baseline app run from the first step to
the last one that uses them, so that connection pools and caches are warm):

1. ``POST /api/v1/messages`` against the baseline's ``POST /messages`` at each concurrency (no dispatcher runs,
   so the API has the machine to itself, as the baseline does);
2. ``GET`` one message by id and the first page of the list (limit 20), with ``read_rows`` final messages (and one
   attempt each) in the table for the user, against the baseline's single-query reads of the same rows;
3. overload: twice the sustainable rate, as 256 closed-loop connections and as an open-loop schedule;
4. POST to first attempt: one dispatcher running, a steady 50 requests per second;
5. dispatcher throughput with 1, 2 and 4 replicas, against the bare claim loops of :mod:`bench.claimloop`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bench.baseline import BASELINE_DDL
from bench.claimloop import QUEUE_DDL
from bench.support import (PYTHON, Child, Children, ScratchDatabase, dump_json, execute, free_port, percentile, scalar,
                           service_environ, wait_for_log, wait_http_ok, wait_until)
from common.settings import PROJECT_ROOT

log = logging.getLogger("bench")

# Every table of schema.sql (whatever it holds today), not the baselines' own.
SMSGATE_TABLES_SQL = r"SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT LIKE 'bench\_%'"
USER = "bench"
HEADERS = {"Authorization": f"SMSAUTH:{USER}", "Content-Type": "application/json"}
POST_BODY = '{"phone": "+7999{seq6}4", "text": "bench {seq}", "provider": "stub"}'
READ_ROWS_SQL = """
INSERT INTO messages (username, phone, text, requested_provider, provider, send_status, delivery_status, due_at,
                      created_at, sent_at, updated_at)
SELECT %s, '+7999' || lpad(g::text, 7, '0'), 'read ' || g, 'stub', 'stub', 'sent', 'unsupported', NULL,
       now() - g * interval '1 second', now() - g * interval '1 second' + interval '10 ms', now()
FROM generate_series(1, %s) AS g
"""
READ_ATTEMPTS_SQL = """
INSERT INTO attempts (message_id, number, provider, started_at, finished_at, result)
SELECT id, 1, 'stub', created_at + interval '5 ms', sent_at, 'ok' FROM messages WHERE username = %s
"""
QUEUED_SQL = """
INSERT INTO messages (username, phone, text, requested_provider)
SELECT 'bench-dispatch', '+7999' || lpad(g::text, 7, '0'), 'dispatch ' || g, 'stub' FROM generate_series(1, %s) AS g
"""
BASELINE_QUEUED_SQL = """
INSERT INTO bench_baseline_queue (phone, text)
SELECT '+7999' || lpad(g::text, 7, '0'), 'dispatch ' || g FROM generate_series(1, %s) AS g
"""
FIRST_ATTEMPT_SQL = """
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY first_attempt), percentile_cont(0.99) WITHIN GROUP (ORDER BY
       first_attempt), max(first_attempt),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY sent), percentile_cont(0.99) WITHIN GROUP (ORDER BY sent), max(sent)
FROM (SELECT extract(epoch FROM a.started_at - m.created_at) * 1000 AS first_attempt,
             extract(epoch FROM m.sent_at - m.created_at) * 1000 AS sent
      FROM messages m JOIN attempts a ON a.message_id = m.id AND a.number = 1) AS s
"""


@dataclass(frozen=True)
class Plan:  # pylint: disable=too-many-instance-attributes
    """How long and how hard each step runs."""

    name: str
    post_concurrency: tuple[int, ...]
    get_concurrency: tuple[int, ...]
    step: float                 # measured seconds per load step
    warmup: float               # seconds before measuring, per closed-loop step
    read_rows: int
    dispatch_messages: int
    replicas: tuple[int, ...]
    latency_rate: float
    latency_duration: float
    overload_connections: int
    overload_duration: float
    rounds: int = 1             # each POST/GET pair is measured this many times; the report keeps the best


FULL = Plan("full", (1, 8, 32, 64), (1, 32), 6.0, 1.0, 100_000, 20_000, (1, 2, 4), 50.0, 10.0, 256, 10.0, 2)
QUICK = Plan("quick", (8, 32), (32,), 2.5, 0.5, 20_000, 2_000, (1, 2), 50.0, 3.0, 256, 2.5, 1)


class Runner:
    """Runs the steps of a :class:`Plan` against one scratch database; ``results`` collects the numbers."""

    def __init__(self, plan: Plan, db: ScratchDatabase, kids: Children, workdir: Path) -> None:
        """Work in ``db``, start processes through ``kids``, keep specs and logs in ``workdir``."""
        self.plan = plan
        self.db = db
        self.kids = kids
        self.workdir = workdir
        self.api: Child | None = None
        self.baseline: Child | None = None
        self.urls: dict[str, str] = {}
        self.results: dict[str, Any] = {"plan": asdict(plan), "post": [], "get": [], "errors": []}

    # --- processes ------------------------------------------------------------------------------------------

    def service_env(self, **extra: str) -> dict[str, str]:
        """The environment of a service process: this database, default settings otherwise."""
        return service_environ(DATABASE_URL=self.db.dsn, HOST="127.0.0.1", SENT_SMS_DIR=str(self.workdir / "sent"),
                               **extra)

    def start_api(self) -> None:
        """``python -m api`` on a free port; returns once /ready answers 200."""
        port = free_port()
        self.api = self.kids.spawn("api", ["-m", "api"], self.service_env(PORT=str(port)))
        self.urls["smsgate"] = f"http://127.0.0.1:{port}"
        wait_http_ok(self.urls["smsgate"] + "/ready", self.api)

    def start_baseline(self) -> None:
        """``python -m bench.baseline`` on a free port, with its table."""
        execute(self.db.dsn, BASELINE_DDL)
        port = free_port()
        env = service_environ(BENCH_DSN=self.db.dsn, PORT=str(port))
        self.baseline = self.kids.spawn("baseline", ["-m", "bench.baseline"], env)
        self.urls["baseline"] = f"http://127.0.0.1:{port}"
        wait_http_ok(self.urls["baseline"] + "/health", self.baseline)

    def truncate(self) -> None:
        """Empty smsgate's tables."""
        tables = ", ".join(f'"{row[0]}"' for row in execute(self.db.dsn, SMSGATE_TABLES_SQL))
        execute(self.db.dsn, f"TRUNCATE {tables}")

    # --- load -----------------------------------------------------------------------------------------------

    def load(self, label: str, server: Child | None, **spec: Any) -> dict[str, Any]:
        """Run one :mod:`bench.loadgen` process with ``spec``; its summary, with ``label``."""
        if server is not None:
            spec["watch_pid"] = server.pid
        spec["db_name"] = self.db.name
        path = self.workdir / f"spec-{label}.json"
        dump_json(path, spec)
        log_offset = self.api.log.stat().st_size if server is self.api and self.api is not None else None
        bound = spec.get("warmup", 0.0) + spec.get("duration", 10.0) + spec.get("timeout", 5.0) + 60
        done = subprocess.run([PYTHON, "-m", "bench.loadgen", str(path)], cwd=PROJECT_ROOT, capture_output=True,
                              timeout=bound, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed for {label}: {done.stderr.decode(errors='replace')[-2000:]}")
        summary: dict[str, Any] = json.loads(done.stdout)
        summary["label"] = label
        if log_offset is not None and self.api is not None:
            summary["server_side"] = access_log_summary(self.api.log, log_offset)
        lat = summary["latency_ms"]
        log.info("%-28s %8.1f req/s  p50 %7.2f  p99 %7.2f  max %7.2f ms  server cpu %4.0f%%  %s", label,
                 summary["throughput"], lat["p50"], lat["p99"], lat["max"], 100 * summary.get("server_cpu", 0),
                 summary["outcomes"])
        return summary

    def target(self, name: str) -> tuple[str, Child | None, str]:
        """(base URL, server process, path prefix) of ``smsgate`` or ``baseline``."""
        if name == "smsgate":
            return self.urls["smsgate"], self.api, "/api/v1"
        return self.urls["baseline"], self.baseline, ""

    def step(self, name: str, action: Callable[[], None]) -> None:
        """Run one step; a failure is recorded and the next step still runs."""
        log.info("--- %s", name)
        started = time.monotonic()
        try:
            action()
        except Exception as exc:  # pylint: disable=broad-exception-caught  # report it, go on with the rest
            log.exception("step %s failed", name)
            self.results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
        self.results.setdefault("step_seconds", {})[name] = round(time.monotonic() - started, 1)

    # --- steps ----------------------------------------------------------------------------------------------

    def run_all(self) -> dict[str, Any]:
        """Every step in order; returns ``results``."""
        self.start_api()
        self.start_baseline()
        self.step("post", self.post)
        self.step("get", self.get)
        self.step("overload", self.overload)
        if self.baseline is not None:
            self.baseline.stop()
        self.step("first_attempt_latency", self.first_attempt_latency)
        if self.api is not None:
            self.api.stop()
        self.step("dispatch", self.dispatch)
        return self.results

    def post(self) -> None:
        """POST at each concurrency, smsgate and baseline in turn; the whole series once per round."""
        for round_no in range(1, self.plan.rounds + 1):
            for concurrency in self.plan.post_concurrency:
                for name in ("smsgate", "baseline"):
                    base, server, prefix = self.target(name)
                    summary = self.load(f"post-{name}-c{concurrency}-r{round_no}", server, base_url=base,
                                        method="POST", paths=[prefix + "/messages"], headers=HEADERS,
                                        bodies=[POST_BODY], concurrency=concurrency, duration=self.plan.step,
                                        warmup=self.plan.warmup)
                    self.results["post"].append({"target": name, "round": round_no, **summary})
        self.truncate()

    def get(self) -> None:
        """GET by id and GET list with ``read_rows`` final messages of the user in the table."""
        started = time.monotonic()
        execute(self.db.dsn, READ_ROWS_SQL, (USER, self.plan.read_rows))
        execute(self.db.dsn, READ_ATTEMPTS_SQL, (USER,))
        execute(self.db.dsn, "VACUUM ANALYZE messages, attempts")
        self.results["read_rows"] = {"rows": self.plan.read_rows, "insert_seconds": round(time.monotonic() - started,
                                                                                          1)}
        ids = [str(row[0]) for row in execute(self.db.dsn, "SELECT id FROM messages ORDER BY random() LIMIT 1000")]
        for round_no in range(1, self.plan.rounds + 1):
            for kind in ("by_id", "list"):
                for concurrency in self.plan.get_concurrency:
                    for name in ("smsgate", "baseline"):
                        self.get_step(kind, concurrency, name, ids, round_no)
        self.truncate()

    def get_step(self, kind: str, concurrency: int, name: str, ids: list[str], round_no: int) -> None:
        """One GET measurement."""
        base, server, prefix = self.target(name)
        paths = [f"{prefix}/messages/{i}" for i in ids] if kind == "by_id" else [f"{prefix}/messages?limit=20"]
        summary = self.load(f"get-{kind}-{name}-c{concurrency}-r{round_no}", server, base_url=base, method="GET",
                            paths=paths, headers=HEADERS, concurrency=concurrency, duration=self.plan.step,
                            warmup=self.plan.warmup)
        self.results["get"].append({"target": name, "kind": kind, "round": round_no, **summary})

    def sustainable_rate(self) -> float:
        """smsgate's POST throughput at 32 connections (the highest measured when 32 was not run)."""
        rows = [r for r in self.results["post"] if r["target"] == "smsgate"]
        at_32 = [r["ok_throughput"] for r in rows if r["concurrency"] == 32]
        return float(max(at_32) if at_32 else max((r["ok_throughput"] for r in rows), default=100.0))

    def overload(self) -> None:
        """About twice the sustainable rate: many closed-loop connections, then an open-loop schedule."""
        sustainable = self.sustainable_rate()
        base, server, _ = self.target("smsgate")
        common: dict[str, Any] = {"base_url": base, "method": "POST", "paths": ["/api/v1/messages"],
                                  "headers": HEADERS, "bodies": [POST_BODY], "duration": self.plan.overload_duration}
        closed = self.load(f"overload-closed-c{self.plan.overload_connections}", server,
                           concurrency=self.plan.overload_connections, warmup=0.5, **common)
        rate = round(2 * sustainable, 1)
        opened = self.load(f"overload-open-{rate:g}rps", server, concurrency=1024, rate=rate, **common)
        self.results["overload"] = {"sustainable": sustainable, "closed": closed, "open": opened}
        self.truncate()

    def first_attempt_latency(self) -> None:
        """One dispatcher, a steady POST rate: from created_at to the first attempt's start, and to sent_at."""
        self.truncate()
        dispatcher = self.kids.spawn("dispatcher-latency", ["-m", "dispatcher"], self.service_env())
        if not wait_for_log(dispatcher, "dispatcher started", 30):
            raise RuntimeError(f"dispatcher did not start:\n{dispatcher.log_text()[-2000:]}")
        base, server, _ = self.target("smsgate")
        summary = self.load("latency-post", server, base_url=base, method="POST", paths=["/api/v1/messages"],
                            headers=HEADERS, bodies=[POST_BODY], rate=self.plan.latency_rate, concurrency=64,
                            duration=self.plan.latency_duration)
        finished = wait_until(lambda: scalar(self.db.dsn, "SELECT count(*) FROM messages WHERE due_at IS NOT NULL")
                              == 0, 60, 0.2)
        row = execute(self.db.dsn, FIRST_ATTEMPT_SQL)[0]
        dispatcher.stop()
        self.results["first_attempt"] = {
            "rate": self.plan.latency_rate, "duration": self.plan.latency_duration, "post": summary,
            "all_finished": finished, "messages": row[0],
            "first_attempt_ms": {"p50": _ms(row[1]), "p99": _ms(row[2]), "max": _ms(row[3])},
            "sent_ms": {"p50": _ms(row[4]), "p99": _ms(row[5]), "max": _ms(row[6])}}
        log.info("first attempt after POST: %s", self.results["first_attempt"]["first_attempt_ms"])
        self.truncate()

    def dispatch(self) -> None:
        """Drain ``dispatch_messages`` queued stub messages with R replicas; then the baselines, R processes each."""
        runs = []
        for replicas in self.plan.replicas:
            runs.append(self.dispatch_smsgate(replicas))
            for mode in ("batch", "finish"):
                runs.append(self.dispatch_baseline(replicas, mode))
        self.results["dispatch"] = runs

    def dispatch_smsgate(self, replicas: int) -> dict[str, Any]:
        """N queued stub messages, R ``python -m dispatcher`` processes, until every message is sent."""
        count = self.plan.dispatch_messages
        self.truncate()
        execute(self.db.dsn, QUEUED_SQL, (count,))
        execute(self.db.dsn, "VACUUM ANALYZE messages")
        started = time.monotonic()
        procs = [self.kids.spawn(f"dispatcher-{replicas}x-{i}", ["-m", "dispatcher"], self.service_env())
                 for i in range(replicas)]
        peak = 0

        def finished() -> bool:
            """Every message sent (and the peak of connections so far noted)."""
            nonlocal peak
            peak = max(peak, int(scalar(self.db.dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                        (self.db.name,))))
            return bool(scalar(self.db.dsn, "SELECT count(*) FROM messages WHERE due_at IS NULL") == count)

        done = wait_until(finished, 60 if self.plan.name == "quick" else 300, 0.25)
        result = {"target": "smsgate", "replicas": replicas, "messages": count, "finished": done,
                  "wall_seconds": round(time.monotonic() - started, 3), "exit_codes": [p.stop() for p in procs],
                  "peak_connections": peak,
                  "error_log_lines": sum(p.log_text().count('"level": "error"') for p in procs),
                  **self.dispatch_outcome(count)}
        log.info("dispatch smsgate x%d: %.1f msg/s (%.2f s by the database, %.2f s wall), peak %d connections",
                 replicas, result["rate"], result["db_seconds"], result["wall_seconds"], peak)
        return result

    def dispatch_outcome(self, count: int) -> dict[str, Any]:
        """How long draining took by the database's clock, and how many attempts it made."""
        elapsed = float(scalar(self.db.dsn, "SELECT extract(epoch FROM (SELECT max(updated_at) FROM messages) - "
                                            "(SELECT min(started_at) FROM attempts))") or 0.0)
        sent, attempts, most = execute(self.db.dsn, """
            SELECT (SELECT count(*) FROM messages WHERE send_status = 'sent'), (SELECT count(*) FROM attempts),
                   (SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM attempts GROUP BY message_id) AS c)
            """)[0]
        return {"db_seconds": round(elapsed, 3), "rate": round(count / elapsed, 1) if elapsed > 0 else 0.0,
                "sent": sent, "attempts": attempts, "max_attempts_per_message": most}

    def dispatch_baseline(self, replicas: int, mode: str) -> dict[str, Any]:
        """The same number of rows drained by R :mod:`bench.claimloop` processes in ``mode``."""
        count = self.plan.dispatch_messages
        execute(self.db.dsn, QUEUE_DDL)
        execute(self.db.dsn, "TRUNCATE bench_baseline_queue")
        execute(self.db.dsn, BASELINE_QUEUED_SQL, (count,))
        execute(self.db.dsn, "VACUUM ANALYZE bench_baseline_queue")
        started = time.monotonic()
        env = service_environ(BENCH_DSN=self.db.dsn)
        procs = [self.kids.spawn(f"claimloop-{mode}-{replicas}x-{i}", ["-m", "bench.claimloop", mode, "300"], env)
                 for i in range(replicas)]
        done = wait_until(lambda: not any(p.alive() for p in procs), 300, 0.05)
        wall = time.monotonic() - started
        codes = [p.stop() for p in procs]
        elapsed, sent = execute(self.db.dsn, "SELECT extract(epoch FROM max(updated_at) - min(updated_at)), "
                                             "count(*) FILTER (WHERE status = 'sent') FROM bench_baseline_queue")[0]
        elapsed = float(elapsed or 0.0)
        result = {"target": f"baseline-{mode}", "replicas": replicas, "messages": count, "finished": done,
                  "db_seconds": round(elapsed, 3), "wall_seconds": round(wall, 3),
                  "rate": round(count / elapsed, 1) if elapsed > 0 else 0.0, "sent": sent, "exit_codes": codes}
        log.info("dispatch baseline-%s x%d: %.1f msg/s", mode, replicas, result["rate"])
        return result


def access_log_summary(path: Path, offset: int) -> dict[str, Any]:
    """The API's own view of the requests it logged after ``offset``: count, p99, max and how many took > 1 s.

    The API times a request from its first middleware to its answer; time spent before that (in the socket
    backlog, or waiting for a busy event loop to read it) is not in these numbers but is in the client's.
    """
    durations: list[float] = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh:
            if line.startswith(b"{") and b'"http_request"' in line:
                try:
                    durations.append(float(json.loads(line)["duration_ms"]))
                except (ValueError, KeyError):
                    continue
    durations.sort()
    return {"count": len(durations), "p99_ms": round(percentile(durations, 0.99), 1),
            "max_ms": round(durations[-1], 1) if durations else 0.0, "over_1s": sum(1 for d in durations if d > 1000)}


def _ms(value: Any) -> float | None:
    """A number of milliseconds from SQL, rounded (None stays None)."""
    return None if value is None else round(float(value), 1)


def setup_logging() -> None:
    """Progress lines on stderr."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s bench: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
