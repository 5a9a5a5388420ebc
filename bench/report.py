"""``docs/benchmarks.md`` from the numbers a run collected (which also go, raw, to ``docs/benchmarks.json``)."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from typing import Any, Iterable

from bench.support import postgres_version, scalar
from common.settings import PROJECT_ROOT

COMMANDS = """\
```sh
make bench                                   # = .venv/bin/python -m bench: the full run (about 6 minutes)
.venv/bin/python -m bench --quick            # about a minute: a smoke check; prints the tables, writes no file
.venv/bin/python -m bench --quick --out /tmp/quick.md   # the same, with a report
DATABASE_URL=postgresql://u:p@127.0.0.1/db .venv/bin/python -m bench   # another server (needs CREATEDB)
```

What the script starts (all on 127.0.0.1, each a process of its own, all stopped and the database dropped at the
end):

| process | command |
| --- | --- |
| the API | `DATABASE_URL=<scratch db> HOST=127.0.0.1 PORT=<free port> .venv/bin/python -m api` (default settings) |
| the baseline app | `BENCH_DSN=<scratch db> PORT=<free port> .venv/bin/python -m bench.baseline` |
| each load step | `.venv/bin/python -m bench.loadgen <spec.json>` |
| dispatchers | `DATABASE_URL=<scratch db> .venv/bin/python -m dispatcher` (1, 2 or 4 at once; default settings) |
| baseline claim loops | `BENCH_DSN=<scratch db> .venv/bin/python -m bench.claimloop batch\\|finish` (one per replica) |
"""

METHOD = """\
- **Load generator.** `bench/loadgen.py`, a small asyncio client on aiohttp, in a process of its own. Why not a
  dedicated tool: `wrk` (and `hey`, `vegeta`, `k6`) are not installed and nothing is downloaded for a benchmark,
  while aiohttp is already in the virtualenv; it keeps HTTP/1.1 connections alive (one per worker, like a real
  client pool) and times every request by itself (`perf_counter` around the whole exchange), so p50/p99/max are
  exact, not read off a histogram. Its own CPU use is reported (`client cpu`, 1.0 = one core) because on this
  machine it competes with the server: it is part of what limits the highest rates.
- **Closed loop** (the POST and GET tables): *c* workers, each sending its next request when the previous one
  is answered, for a warm-up and then a fixed measured time; throughput = requests started in the measured time
  divided by it. **Open loop** (latency, overload): requests start on a fixed schedule whatever the answers do.
- **One machine.** Client, API, PostgreSQL and dispatchers share the same cores, so absolute numbers are low and
  the ratios are what carries over: both sides of each ratio ran on the same machine, database and client,
  one right after the other. `API cpu` is the share of one core the measured server process used. `other cpu`
  (smsgate step / baseline step) is what every *other* process on the machine used meanwhile (not the client,
  not the server under test, not the PostgreSQL backends of the bench database): other people's work that
  competed for the cores; a step where it reaches 0.2 is shown in bold and its numbers are low.
- **Baselines.** POST: one INSERT into a table shaped like `messages` through aiopg, answering the id; GET: the
  one SELECT a bare app needs, on smsgate's own `messages` rows; dispatch: `bench/claimloop.py` in two forms,
  `batch` (one `WITH due AS (... FOR UPDATE SKIP LOCKED) UPDATE ... SET status='sent', due_at=NULL` per 32 rows)
  and `finish` (claim 32 under a token, then one token-checked UPDATE per row: the least a per-message outcome
  with stale-write protection costs). The ratio is smsgate / baseline: 0.5 means half the baseline's rate.
- **The service runs with its default settings** (API pool 10, `max_concurrency` 64, 0.8 s deadline, INFO JSON
  logs written to a file; dispatcher batch 32, 64 in flight), in a fresh database `smsgate_bench_<pid>`.
"""


DISTURBED = 0.2  # cores used by processes outside the measurement beyond which a step counts as disturbed


def environment(dsn: str, source: str) -> dict[str, Any]:
    """What the numbers depend on: machine, versions, database, load."""
    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu_model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem_kb = int(next(line.split()[1] for line in fh if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=False).stdout.strip() != ""
    versions = {name: _version(name) for name in ("aiohttp", "aiopg", "psycopg2-binary", "SQLAlchemy")}
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "nproc": nproc or os.cpu_count(),
            "cpu": cpu_model, "memory_gib": round(mem_kb / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), "postgresql": postgres_version(dsn), "database": source,
            "max_connections": int(scalar(dsn, "SHOW max_connections")), "git_dirty": dirty,
            "packages": versions, "git_commit": commit, "loadavg_before": loadavg()}


def _version(name: str) -> str:
    """An installed distribution's version, or '?'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def loadavg() -> str:
    """The 1/5/15-minute load averages."""
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def _ratio(ours: float, theirs: float) -> str:
    """smsgate / baseline, formatted."""
    return f"{ours / theirs:.2f}" if theirs else "n/a"


def _lat(summary: dict[str, Any]) -> str:
    """'p50 / p99 / max' in ms."""
    lat = summary["latency_ms"]
    return f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f}"


def _other(summary: dict[str, Any]) -> str:
    """CPU used by processes outside the measurement (other people's work), flagged when it is large."""
    other = float(summary.get("other_cpu", 0.0))
    return f"**{other:.2f}**" if other >= DISTURBED else f"{other:.2f}"


def _errors(summary: dict[str, Any]) -> str:
    """Non-2xx outcomes, or 'none'."""
    bad = {k: v for k, v in summary["outcomes"].items() if not k.startswith("2")}
    return ", ".join(f"{k} × {v}" for k, v in bad.items()) or "none"


def _pairs(rows: Iterable[dict[str, Any]], key: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(smsgate, baseline) summaries with the same ``key(row)``, in run order; of several rounds, the best."""
    ours: dict[Any, dict[str, Any]] = {}
    theirs: dict[Any, dict[str, Any]] = {}
    order: list[Any] = []
    for row in rows:
        k = key(row)
        if k not in order:
            order.append(k)
        side = ours if row["target"] == "smsgate" else theirs
        if k not in side or row["ok_throughput"] > side[k]["ok_throughput"]:
            side[k] = row
    return [(ours[k], theirs[k]) for k in order if k in ours and k in theirs]


def http_table(rows: Iterable[dict[str, Any]], key: Any, first: str) -> list[str]:
    """A markdown table comparing smsgate with the baseline, one line per ``key``."""
    lines = [f"| {first} | smsgate req/s | baseline req/s | ratio | smsgate p50 / p99 / max ms | "
             "baseline p50 / p99 / max ms | API cpu | client cpu | other cpu | smsgate non-2xx | baseline non-2xx |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for ours, theirs in _pairs(rows, key):
        lines.append(f"| {key(ours)} | {ours['ok_throughput']:.0f} | {theirs['ok_throughput']:.0f} | "
                     f"**{_ratio(ours['ok_throughput'], theirs['ok_throughput'])}** | {_lat(ours)} | {_lat(theirs)} | "
                     f"{ours.get('server_cpu', 0):.2f} | {ours.get('client_cpu', 0):.2f} | "
                     f"{_other(ours)} / {_other(theirs)} | {_errors(ours)} | {_errors(theirs)} |")
    return lines


def dispatch_table(runs: list[dict[str, Any]]) -> list[str]:
    """Dispatcher throughput per replica count, with both baselines."""
    lines = ["| replicas | smsgate msg/s | baseline `batch` msg/s | ratio | baseline `finish` msg/s | ratio | "
             "smsgate s (db / wall) | peak connections | attempts per message | exit codes |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    by = {(r["target"], r["replicas"]): r for r in runs}
    for replicas in sorted({r["replicas"] for r in runs}):
        ours = by.get(("smsgate", replicas))
        batch = by.get(("baseline-batch", replicas))
        finish = by.get(("baseline-finish", replicas))
        if ours is None or batch is None or finish is None:
            continue
        exact = "1 (exactly once)" if ours["attempts"] == ours["messages"] and ours["max_attempts_per_message"] == 1 \
            else f"max {ours['max_attempts_per_message']}, {ours['attempts']} in all"
        done = "" if ours["finished"] else " (**did not finish**)"
        lines.append(f"| {replicas} | {ours['rate']:.0f}{done} | {batch['rate']:.0f} | "
                     f"**{_ratio(ours['rate'], batch['rate'])}** | {finish['rate']:.0f} | "
                     f"**{_ratio(ours['rate'], finish['rate'])}** | {ours['db_seconds']:.1f} / "
                     f"{ours['wall_seconds']:.1f} | {ours['peak_connections']} | {exact} | {ours['exit_codes']} |")
    return lines


def overload_lines(over: dict[str, Any]) -> list[str]:
    """The overload table and its reading."""
    lines = [f"Sustainable rate (smsgate POST at 32 connections): **{over['sustainable']:.0f} req/s**.", "",
             "| drive | answers/s | 201/s | 503 share | 503 codes | other non-2xx | max latency ms | "
             "p99 ms | answers > 1 s | API's own max ms / > 1 s | API cpu | client cpu / loop lag max ms |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in (("closed", f"{over['closed']['concurrency']} connections, closed loop"),
                        ("open", f"open loop at {over['open']['rate']:g} req/s (2 × sustainable)")):
        run = over[name]
        server = run.get("server_side", {})
        outcomes = run["outcomes"]
        total = max(1, run["requests"])
        codes = {k: v for k, v in outcomes.items() if k.startswith("503")}
        other = {k: v for k, v in outcomes.items() if not k.startswith(("2", "503"))}
        lines.append(f"| {label} | {run['throughput']:.0f} | {run['ok_throughput']:.0f} | "
                     f"{sum(codes.values()) / total:.1%} | {', '.join(f'{k} × {v}' for k, v in codes.items())} | "
                     f"{', '.join(f'{k} × {v}' for k, v in other.items()) or 'none'} | "
                     f"{run['latency_ms']['max']:.1f} | {run['latency_ms']['p99']:.1f} | {run['over_1s']} | "
                     f"{server.get('max_ms', 0):.1f} / {server.get('over_1s', 0)} | {run.get('server_cpu', 0):.2f} | "
                     f"{run.get('client_cpu', 0):.2f} / {run.get('client_loop_lag_ms', {}).get('max', 0):.0f} |")
        if run.get("dropped"):
            lines.append(f"| (open loop: {run['dropped']} starts skipped, 1024 outstanding) | | | | | | | | | | | |")
    return lines


def overload_findings(over: dict[str, Any]) -> list[str]:
    """What the overload runs show: the 1 s promise, goodput, and answers whose outcome is unknown."""
    notes = []
    sustainable = max(1.0, over["sustainable"])
    for name in ("closed", "open"):
        run = over[name]
        server = run.get("server_side", {})
        drive = (f"{run['concurrency']} closed-loop connections" if name == "closed"
                 else f"an open loop at {run['rate']:g} req/s")
        late = run["over_1s"]
        notes.append(
            f"- Under {drive}: {run['ok_throughput']:.0f} × 201 per second ({run['ok_throughput'] / sustainable:.0%} "
            f"of the sustainable rate), slowest answer {run['latency_ms']['max']:.0f} ms by the client "
            f"({server.get('max_ms', 0):.0f} ms by the API's own log); {late} answer(s) over 1 s"
            + (" (**the 1 s promise was broken**)." if late else " (the 1 s promise held)."))
        unknown = run["outcomes"].get("503:outcome_unknown", 0)
        if unknown:
            notes.append(f"  {unknown} answer(s) were `503 outcome_unknown`: the COMMIT had been sent, so those "
                         "messages may well be stored; a client retrying without an Idempotency-Key sends them twice.")
    return notes


def findings(results: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers (what a reader should notice)."""
    notes = []
    posts = _pairs(results.get("post", []), lambda r: r["concurrency"])
    if posts:
        best = max(posts, key=lambda p: p[0]["ok_throughput"])
        notes.append(f"- POST peaks at {best[0]['ok_throughput']:.0f} req/s (c={best[0]['concurrency']}), "
                     f"{_ratio(best[0]['ok_throughput'], best[1]['ok_throughput'])} × the baseline's "
                     f"{best[1]['ok_throughput']:.0f} req/s; the API process then uses "
                     f"{best[0].get('server_cpu', 0):.0%} of a core: it is CPU-bound in Python (validation, "
                     "middlewares, JSON logging), not waiting on PostgreSQL.")
        shed = [p[0] for p in posts if any(k.startswith("503") for k in p[0]["outcomes"])]
        if shed:
            notes.append("- Some closed-loop POST steps got 503s: " + "; ".join(
                f"c={s['concurrency']}: {_errors(s)}" for s in shed) + ".")
    over = results.get("overload")
    if over:
        notes += overload_findings(over)
    first = results.get("first_attempt")
    if first:
        notes.append(f"- At {first['rate']:g} POST/s with one dispatcher, the first attempt starts "
                     f"{first['first_attempt_ms']['p50']} ms (p50) / {first['first_attempt_ms']['p99']} ms (p99) after "
                     "the message is stored (NOTIFY wakes the dispatcher; no polling delay).")
    disturbed = [r["label"] for r in results.get("post", []) + results.get("get", [])
                 if float(r.get("other_cpu", 0.0)) >= DISTURBED]
    if disturbed:
        notes.append(f"- Other processes used ≥ {DISTURBED} of a core during: {', '.join(disturbed)}; those numbers "
                     "are pessimistic (the machine was shared while the run went on).")
    runs = results.get("dispatch", [])
    ours = [r for r in runs if r["target"] == "smsgate"]
    if len(ours) > 1:
        scale = ", ".join(f"{r['replicas']}: {r['rate']:.0f}" for r in ours)
        notes.append(f"- Dispatcher msg/s by replicas ({scale}): on {results['environment']['nproc']} cores the "
                     "replicas share the CPU with PostgreSQL, so more replicas add little once the cores are busy.")
    most = max(ours, key=lambda r: r["peak_connections"], default=None)
    limit = results["environment"].get("max_connections")
    if most is not None and limit:
        notes.append(f"- {most['replicas']} dispatcher replicas held up to {most['peak_connections']} connections to "
                     f"the database (each pools up to min(max_in_flight, 8) + 2 and LISTENs on one more), "
                     f"{most['peak_connections'] / limit:.0%} of this server's max_connections ({limit}): a fifth "
                     "replica, or the API next to four, would run into it.")
    if any(r.get("error_log_lines") for r in ours):
        notes.append("- Dispatcher error log lines: " + ", ".join(
            f"{r['replicas']} replicas: {r['error_log_lines']}" for r in ours if r.get("error_log_lines")) + ".")
    return notes


def _rounds_note(rounds: int) -> str:
    """How the rows were chosen when each step ran several times."""
    if rounds <= 1:
        return "Each step ran once."
    return (f"The whole series ran {rounds} times, a minute or so apart; each row shows the round with the "
            "higher 2xx rate for each side (the machine is shared, so the best round is the least disturbed); "
            "every round is in the JSON.")


def _row(label: str, values: dict[str, Any]) -> str:
    """A table row of p50, p99 and max."""
    return f"| {label} | {values['p50']} | {values['p99']} | {values['max']} |"


def _tree_state(dirty: bool | None) -> str:
    """What the commit line says about the work tree (reports older than the flag cannot tell)."""
    if dirty is None:
        return "(plus any uncommitted changes in the tree)"
    return "(with uncommitted changes to tracked files)" if dirty else "(clean tree)"


def render(results: dict[str, Any]) -> str:
    """The whole markdown report."""
    env = results["environment"]
    out = ["# smsgate benchmarks", "",
           f"Generated by `python -m bench` ({results['plan']['name']} run) on {env['date']}, in "
           f"{results.get('total_seconds', 0):.0f} s. The raw numbers are in `docs/benchmarks.json`.", "",
           "## How to run", "", COMMANDS, "## Machine and versions", "",
           "| | |", "| --- | --- |",
           f"| `nproc` | {env['nproc']} |", f"| CPU | {env['cpu']} |", f"| memory | {env['memory_gib']} GiB |",
           f"| kernel | {env['kernel']} |", f"| Python | {env['python']} |", f"| PostgreSQL | {env['postgresql']} |",
           f"| database | {env['database']}, fresh database per run |",
           "| packages | " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + " |",
           f"| git commit | {env['git_commit']} {_tree_state(env.get('git_dirty'))} |",
           f"| load average before / after | {env['loadavg_before']} / {env.get('loadavg_after', '?')} |", "",
           "## Method", "", METHOD]
    plan = results["plan"]
    out += ["## 1. POST /api/v1/messages against a bare INSERT", "",
            f"Closed loop, {plan['warmup']:g} s warm-up then {plan['step']:g} s per step; stub provider, no dispatcher "
            "running; `Authorization: SMSAUTH:bench`. req/s counts 2xx answers. "
            + _rounds_note(plan.get("rounds", 1)), ""]
    out += http_table(results.get("post", []), lambda r: r["concurrency"], "connections")
    for kind, title in (("by_id", "GET /api/v1/messages/{id}"), ("list", "GET /api/v1/messages?limit=20")):
        out += ["", f"## 2{'a' if kind == 'by_id' else 'b'}. {title}", "",
                f"{results.get('read_rows', {}).get('rows', plan['read_rows']):,} final messages of the user in the "
                "table (one attempt each); ids drawn from 1 000 random ones. The baseline runs one SELECT and dumps "
                "the rows as they come; smsgate runs two (the rows, then their attempts) and serialises through its "
                "schemas. " + _rounds_note(plan.get("rounds", 1)), ""]
        out += http_table([r for r in results.get("get", []) if r["kind"] == kind], lambda r: r["concurrency"],
                          "connections")
    if "dispatch" in results:
        out += ["", "## 3. Dispatcher throughput (stub provider)", "",
                f"{plan['dispatch_messages']:,} queued stub messages inserted first, then the replicas started; "
                "msg/s = messages / (last message's final write − first attempt's start), by the database's clock "
                "(process start-up excluded; `wall` includes it). Baselines drain the same number of rows of "
                "`bench_baseline_queue` with the same number of processes.", ""]
        out += dispatch_table(results["dispatch"])
    if "first_attempt" in results:
        first = results["first_attempt"]
        out += ["", "## 4. From POST to the first attempt", "",
                f"One dispatcher, an open-loop {first['rate']:g} POST/s for {first['duration']:g} s "
                f"({first['messages']} messages, all finished: {first['all_finished']}); times from the database: "
                "`attempts.started_at − messages.created_at` and `sent_at − created_at`.", "",
                "| | p50 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: |",
                _row("created → first attempt starts", first["first_attempt_ms"]),
                _row("created → sent", first["sent_ms"]),
                f"| (the POSTs themselves, client side) | {_lat(first['post']).replace(' / ', ' | ')} |"]
    if "overload" in results:
        out += ["", "## 5. Overload", ""] + overload_lines(results["overload"])
    out += ["", "## What the numbers say", ""] + findings(results)
    if results.get("errors"):
        out += ["", "## Steps that failed", ""] + [f"- {e}" for e in results["errors"]]
    steps = results.get("step_seconds", {})
    out += ["", "Step durations (s): " + ", ".join(f"{k} {v}" for k, v in steps.items()) + ".", ""]
    return "\n".join(out)
