"""The pieces every chaos scenario uses: a stage (scratch database, processes, files), checks, the invariants.

A :class:`Stage` is one scenario's world: a database of its own with ``schema.sql`` applied, a folder for the
``file`` provider and the logs, and the child processes, every one of which is stopped (by its own pid) when the
stage closes.  Service processes run with short leases and timeouts (:data:`CHAOS_SETTINGS`) so that recovery
happens within seconds.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.support import (PYTHON, Child, Children, Params, ScratchDatabase, dump_json, execute, free_port, scalar,
                           service_environ, wait_for_log, wait_http_ok, wait_until)
from common.settings import PROJECT_ROOT
from common.store import ABANDONED_ERROR

CHAOS_SETTINGS = {
    "SMSGATE_DISPATCHER__LEASE_SECONDS": "3",
    "SMSGATE_PROVIDERS__FILE__TIMEOUT": "1",
    "SMSGATE_PROVIDERS__STUB__TIMEOUT": "1",
    "SMSGATE_PROVIDERS__FILE__RETRY_INTERVAL": "0.1",
    "SMSGATE_PROVIDERS__FILE__DELIVERY_DELAY": "0.5",
}
LEASE_SECONDS = 3.0
ATTEMPT_LIMITS = {"file": 3, "stub": 1}
HEADERS = {"Authorization": "SMSAUTH:chaos", "Content-Type": "application/json"}
# One message in three each: file to an even number (sent, then delivered), file to an odd number (fails three
# times), stub (sent once, delivery unsupported).  Every message has a phone number of its own.
MIXED_BODIES = [
    '{"phone": "+7999{seq6}2", "text": "chaos {seq}", "provider": "file"}',
    '{"phone": "+7999{seq6}1", "text": "chaos {seq}", "provider": "file"}',
    '{"phone": "+7999{seq6}3", "text": "chaos {seq}", "provider": "stub"}',
]
FILE_NAME = re.compile(r"(?P<stamp>.+)_(?P<phone>\+\d+)\.txt")


@dataclass
class Check:
    """One invariant and whether it held."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Outcome:
    """What a scenario found: its checks, the numbers worth reporting, or why it was skipped."""

    name: str
    title: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (a skipped scenario is not a failure)."""
        return all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record a check; returns ``ok``."""
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)


class Background:
    """A :mod:`bench.loadgen` process running while the scenario does other things."""

    def __init__(self, stage: Stage, label: str, spec: dict[str, Any]) -> None:
        """Start the load generator with ``spec``; per-request records go to a file of the stage."""
        self.records_path = stage.dir / f"records-{label}.jsonl"
        spec = {**spec, "records": str(self.records_path)}
        spec_path = stage.dir / f"spec-{label}.json"
        dump_json(spec_path, spec)
        self.bound = time.monotonic() + spec.get("duration", 10.0) + spec.get("timeout", 5.0) + 60
        self.out_path = stage.dir / f"loadgen-{label}.out"
        with open(self.out_path, "wb") as out:
            # pylint: disable-next=consider-using-with  # waited for in result()
            self.proc = subprocess.Popen([PYTHON, "-m", "bench.loadgen", str(spec_path)], cwd=PROJECT_ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)

    def done(self) -> bool:
        """True once the load generator has exited."""
        return self.proc.poll() is not None

    def result(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Wait for it (bounded); its summary and per-request records."""
        try:
            self.proc.wait(timeout=max(1.0, self.bound - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the load generator did not finish in time") from None
        text = self.out_path.read_text(encoding="utf-8", errors="replace")
        if self.proc.returncode != 0:
            raise RuntimeError(f"the load generator failed: {text[-2000:]}")
        summary: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        with open(self.records_path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        return summary, records


class Stage:
    """A scenario's database, folder and processes (``with Stage(...) as stage``)."""

    def __init__(self, admin_dsn: str, name: str, workdir: Path) -> None:
        """A stage called ``name`` on the server of ``admin_dsn``, with its files under ``workdir/name``."""
        self.name = name
        self.db = ScratchDatabase(admin_dsn, f"smsgate_chaos_{os.getpid()}_{name}")
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sent_dir = self.dir / "sent_sms"
        self.kids = Children(self.dir)

    def __enter__(self) -> Stage:
        """Create the database."""
        self.db.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Stop the processes, then drop the database."""
        try:
            self.kids.stop_all()
        finally:
            self.db.__exit__(exc_type, exc, traceback)

    @property
    def dsn(self) -> str:
        """The stage's database."""
        return self.db.dsn

    def env(self, **extra: str) -> dict[str, str]:
        """A service process's environment: this database, the chaos settings, ``extra``."""
        return service_environ(DATABASE_URL=self.dsn, HOST="127.0.0.1", SENT_SMS_DIR=str(self.sent_dir),
                               LOG_LEVEL="INFO", **CHAOS_SETTINGS, **extra)

    def api(self, **extra: str) -> tuple[Child, str]:
        """``python -m api`` on a free port, once /ready answers; (process, base URL)."""
        port = free_port()
        child = self.kids.spawn("api", ["-m", "api"], self.env(PORT=str(port), **extra))
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/ready", child)
        return child, url

    def dispatcher(self, name: str, wait: bool = False, **extra: str) -> Child:
        """``python -m dispatcher``; with ``wait``, returns once it has logged its start."""
        child = self.kids.spawn(name, ["-m", "dispatcher"], self.env(**extra))
        if wait and not wait_for_log(child, "dispatcher started", 30):
            raise RuntimeError(f"{name} did not start:\n{child.log_text()[-2000:]}")
        return child

    def load(self, label: str, **spec: Any) -> Background:
        """Start a background load generator."""
        return Background(self, label, spec)

    def rows(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        """Rows of a query on the stage's database."""
        return execute(self.dsn, sql, params)

    def value(self, sql: str, params: Params = None) -> Any:
        """The single value of a query."""
        return scalar(self.dsn, sql, params)

    def unfinished(self) -> int:
        """Messages with work left (sending, retrying or waiting for a delivery check)."""
        return int(self.value("SELECT count(*) FROM messages WHERE due_at IS NOT NULL"))

    def wait_finished(self, timeout: float) -> bool:
        """Wait until no message has work left."""
        return wait_until(lambda: self.unfinished() == 0, timeout, 0.2)


def final_state_checks(stage: Stage, outcome: Outcome) -> None:
    """The invariants every scenario ends with: all finished, within limits, sent once, files written."""
    rows = stage.rows("""
        SELECT m.id, m.requested_provider, m.phone, m.text, m.send_status, m.delivery_status, m.due_at,
               m.attempt_count, count(a.number) AS attempts, count(a.number) FILTER (WHERE a.finished_at IS NULL),
               count(a.number) FILTER (WHERE a.result = 'ok')
        FROM messages m LEFT JOIN attempts a ON a.message_id = m.id GROUP BY m.id""")
    outcome.facts["messages"] = len(rows)
    unfinished = [r for r in rows if r[4] not in ("sent", "failed") or r[5] == "pending" or r[6] is not None]
    outcome.check("every message reached sent or failed, with a final delivery status", not unfinished,
                  f"{len(unfinished)} unfinished" + (f", e.g. {unfinished[0][4]}/{unfinished[0][5]}" if unfinished
                                                     else ""))
    outcome.check("no message stays `sending`", not [r for r in rows if r[4] == "sending"])
    outcome.check("no attempt row is left open", not [r for r in rows if r[9]],
                  f"{sum(r[9] for r in rows)} open attempt(s)")
    over = [r for r in rows if r[8] > ATTEMPT_LIMITS.get(r[1] or "file", 1) or r[7] != r[8]]
    outcome.check("no message has more attempts than its provider allows (file 3, stub 1)", not over,
                  f"{len(over)} over the limit or miscounted" if over else "")
    bad_ok = [r for r in rows if r[10] > 1 or (r[4] == "sent") != (r[10] == 1)]
    outcome.check("sent ⇔ exactly one `ok` attempt (never two)", not bad_ok, f"{len(bad_ok)} message(s)" if bad_ok
                  else "")
    odd_sent = [r for r in rows if r[1] == "file" and int(r[2][-1]) % 2 and r[4] == "sent"]
    outcome.check("no odd number was sent by the file provider", not odd_sent)
    file_checks(stage, outcome, [r for r in rows if r[1] == "file" and r[4] == "sent"])
    outcome.facts["by_status"] = dict(sorted(
        (f"{prov}/{status}", sum(1 for r in rows if r[1] == prov and r[4] == status))
        for prov in ("file", "stub") for status in ("sent", "failed")))
    abandoned = int(stage.value("SELECT count(*) FROM attempts WHERE error = %s", (ABANDONED_ERROR,)))
    outcome.facts["abandoned_attempts"] = abandoned


def file_checks(stage: Stage, outcome: Outcome, sent_file_rows: list[tuple[Any, ...]]) -> None:
    """Files: at least one per file message sent, with the message's text; duplicates and leftovers counted."""
    files = sorted(stage.sent_dir.glob("*.txt")) if stage.sent_dir.exists() else []
    temps = sorted(stage.sent_dir.glob(".*.tmp")) if stage.sent_dir.exists() else []
    by_phone: dict[str, list[Path]] = {}
    for path in files:
        match = FILE_NAME.fullmatch(path.name)
        if match:
            by_phone.setdefault(match["phone"], []).append(path)
    missing = [r for r in sent_file_rows if r[2] not in by_phone]
    wrong = [r for r in sent_file_rows if r[2] in by_phone and any(
        p.read_text(encoding="ascii", errors="replace") != r[3] for p in by_phone[r[2]])]
    outcome.check("number of files ≥ number of file messages sent", len(files) >= len(sent_file_rows),
                  f"{len(files)} files for {len(sent_file_rows)} sent")
    outcome.check("every sent file message has its file, holding its text", not missing and not wrong,
                  f"{len(missing)} without a file, {len(wrong)} with another text" if missing or wrong else "")
    outcome.facts["files"] = len(files)
    outcome.facts["duplicate_files"] = sum(len(v) - 1 for v in by_phone.values())
    outcome.facts["leftover_temp_files"] = len(temps)


def accepted_checks(stage: Stage, outcome: Outcome, records: list[dict[str, Any]]) -> None:
    """Every 201 is a stored message; every 503 (which promises "nothing was stored") is not."""
    stored = {str(r[0]) for r in stage.rows("SELECT id FROM messages")}
    stored_texts = {str(r[0]) for r in stage.rows("SELECT text FROM messages")}
    accepted = [r for r in records if r["status"] == 201]
    lost = [r for r in accepted if r["id"] not in stored]
    outcome.check("nothing accepted (201) is lost", not lost, f"{len(lost)} of {len(accepted)} missing" if lost
                  else f"{len(accepted)} accepted, all stored")
    # A 503 promises that nothing was stored, except "outcome_unknown": a COMMIT was sent and not confirmed in
    # time, so the row may exist (a retry with the same Idempotency-Key tells).
    refused = [r for r in records if r["status"] == 503 and r["code"] != "outcome_unknown"]
    stored_anyway = [r for r in refused if f"chaos {r['seq']}" in stored_texts]
    outcome.check("a 503 (other than outcome_unknown) stored nothing", not stored_anyway,
                  f"{len(stored_anyway)} of {len(refused)} refused requests were stored anyway: "
                  f"{sorted({str(r['code']) for r in stored_anyway})}" if stored_anyway
                  else f"{len(refused)} refused, none stored")
    unknown = [r for r in records if r["status"] == 503 and r["code"] == "outcome_unknown"]
    if unknown:
        landed = sum(1 for r in unknown if f"chaos {r['seq']}" in stored_texts)
        outcome.facts["outcome_unknown_answers_stored"] = f"{landed} of {len(unknown)}"


def describe(doc: str | None) -> list[str]:
    """A module docstring, minus its title line, as report paragraphs (one line each)."""
    paragraphs = (doc or "").split("\n\n")[1:]
    return [" ".join(p.split()).replace("``", "`") for p in paragraphs if p.strip()]


def parse_time(value: str) -> dt.datetime:
    """An ISO 8601 timestamp from the API (``Z`` accepted)."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def log_events(child: Child, *events: str) -> list[dict[str, Any]]:
    """The child's JSON log events whose ``event`` is one of ``events``."""
    return [e for e in child.log_events() if e.get("event") in events]
