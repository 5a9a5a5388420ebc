"""SIGSTOP: a dispatcher paused past its lease while another takes its messages over, then resumed.

Per cycle: a batch of queued messages (file to even numbers, and stub), one dispatcher (the victim) working
them; the victim is paused with SIGSTOP at a moment it holds claimed (``sending``) rows.  A second dispatcher
(the rescuer) starts, keeps sending the other messages at once and, when the victim's lease ends, reclaims the
victim's rows and sends them.  Then the victim gets SIGCONT.  What must hold: every late write of the victim is
rejected (it logs "claim lost; late write rejected", or "lease too short to send" when it had not called the
provider yet), no message gets two ``ok`` attempts, and the final state is clean.
"""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

from bench.support import Child, wait_until
from chaos.harness import LEASE_SECONDS, Outcome, Stage, describe, final_state_checks, log_events
from common.store import ABANDONED_ERROR

QUEUE_SQL = """
INSERT INTO messages (username, phone, text, requested_provider)
SELECT 'chaos', '+7998' || lpad((%(offset)s + g)::text, 6, '0') || CASE WHEN g %% 2 = 0 THEN '4' ELSE '5' END,
       'chaos pause ' || (%(offset)s + g), CASE WHEN g %% 2 = 0 THEN 'file' ELSE 'stub' END
FROM generate_series(1, %(count)s) AS g
"""
REJECTED_EVENTS = ("stale_write_rejected", "send_skipped_lease")


def run(admin_dsn: str, workdir: Path, *, cycles: int, per_cycle: int) -> Outcome:
    """``cycles`` pause-and-resume cycles of ``per_cycle`` fresh messages each."""
    outcome = Outcome("pause", f"SIGSTOP a dispatcher past its lease, then SIGCONT ({cycles} cycle(s))")
    outcome.notes += describe(__doc__)
    rng = random.Random(11)
    totals: dict[str, int] = {}
    with Stage(admin_dsn, "pause", workdir) as stage:
        for cycle in range(cycles):
            stage.rows(QUEUE_SQL, {"offset": cycle * per_cycle, "count": per_cycle})
            run_cycle = Cycle(stage, outcome, cycle)
            if run_cycle.pause(rng):
                run_cycle.take_over()
                run_cycle.resume()
            for key, value in run_cycle.facts.items():
                totals[key] = totals.get(key, 0) + value
        finished = stage.wait_finished(30)
        outcome.check("everything finishes after the pauses", finished)
        final_state_checks(stage, outcome)
    outcome.facts = {**totals, **outcome.facts}
    return outcome


def _catch_holding(stage: Stage, victim_pid_send: Any, rng: random.Random) -> dict[str, str]:
    """Pause the victim at a moment it holds committed claims; {message id: claim token} (empty if never)."""
    for _ in range(60):
        victim_pid_send(signal.SIGSTOP)
        time.sleep(0.05)  # a statement the victim had already sent finishes on the server meanwhile
        held = {str(r[0]): str(r[1]) for r in stage.rows(
            "SELECT id, claim_token FROM messages WHERE send_status = 'sending'")}
        if held:
            return held
        victim_pid_send(signal.SIGCONT)
        time.sleep(rng.uniform(0.01, 0.08))
    return {}


class Cycle:
    """One pause-and-resume cycle; its checks go to the scenario's :class:`Outcome`."""

    def __init__(self, stage: Stage, outcome: Outcome, number: int) -> None:
        """Cycle ``number`` (from 0) on ``stage``."""
        self.stage = stage
        self.outcome = outcome
        self.number = number
        self.label = f"cycle {number + 1}"
        self.victim = stage.dispatcher(f"victim-{number}", wait=True)
        self.rescuer: Child | None = None
        self.held: dict[str, str] = {}
        self.facts: dict[str, int] = {}

    def count(self, sql: str) -> int:
        """A count from the database."""
        return int(self.stage.value(sql))

    def pause(self, rng: random.Random) -> bool:
        """Let the victim work, then pause it while it holds claims; False when that never happened."""
        before = self.count("SELECT count(*) FROM attempts")
        wait_until(lambda: self.count("SELECT count(*) FROM attempts") > before + 10, 20, 0.02)
        self.held = _catch_holding(self.stage, self.victim.send, rng)
        if not self.outcome.check(f"{self.label}: the victim was paused while holding claims", bool(self.held)):
            self.victim.stop()
            return False
        return True

    def take_over(self) -> None:
        """Start the rescuer and wait until it has reclaimed every message the victim holds."""
        paused_at = time.monotonic()
        sent_before = self.count("SELECT count(*) FROM messages WHERE send_status = 'sent'")
        self.rescuer = self.stage.dispatcher(f"rescuer-{self.number}")

        def reclaimed() -> bool:
            """No held message is still under the victim's claim token."""
            now = {str(r[0]): str(r[1]) for r in self.stage.rows(
                "SELECT id, claim_token FROM messages WHERE id = ANY(%s::uuid[])", (list(self.held),))}
            return all(now[i] != token for i, token in self.held.items())

        taken = wait_until(reclaimed, LEASE_SECONDS + 15, 0.1)
        self.facts["sent_by_rescuer_during_pause"] = self.count(
            "SELECT count(*) FROM messages WHERE send_status = 'sent'") - sent_before
        self.facts["reclaimed"] = len(self.held) if taken else 0
        self.outcome.check(f"{self.label}: the rescuer took over every message the paused victim held", taken,
                           f"{len(self.held)} held, paused {time.monotonic() - paused_at:.1f} s "
                           f"(lease {LEASE_SECONDS:g} s)")

    def resume(self) -> None:
        """SIGCONT the victim, let both finish, stop both, and check what the victim did with its stale work."""
        self.victim.send(signal.SIGCONT)
        answered = wait_until(lambda: set(self.held) <= {e.get("message_id") for e in log_events(
            self.victim, *REJECTED_EVENTS)}, 10, 0.1)
        self.stage.wait_finished(20)
        assert self.rescuer is not None
        codes = (self.victim.stop(), self.rescuer.stop())
        events = log_events(self.victim, *REJECTED_EVENTS)
        rejected = {str(e.get("message_id")) for e in events if e.get("event") == "stale_write_rejected"}
        self.outcome.check(f"{self.label}: every late write of the resumed victim was rejected or not attempted",
                           answered, f"{len(set(self.held) & {e.get('message_id') for e in events})}/{len(self.held)} "
                           "held messages logged as 'claim lost; late write rejected' or 'lease too short to send'")
        self.outcome.check(f"{self.label}: both dispatchers exit 0 on SIGTERM", codes == (0, 0), f"exit codes {codes}")
        rows = self.stage.rows("""
            SELECT m.id, m.requested_provider, m.send_status,
                   bool_or(a.error = %s) AS abandoned, count(a.*) FILTER (WHERE a.result = 'ok') AS ok
            FROM messages m JOIN attempts a ON a.message_id = m.id
            WHERE m.id = ANY(%s::uuid[]) GROUP BY m.id""", (ABANDONED_ERROR, list(self.held)))
        abandoned = {str(r[0]) for r in rows if r[3]}
        self.outcome.check(f"{self.label}: the victim's attempts were closed as abandoned by the rescuer",
                           set(self.held) <= abandoned, f"{len(set(self.held) & abandoned)}/{len(self.held)}")
        # Messages the provider took from the paused victim (its record of that was then rejected):
        taken = {str(e.get("message_id")) for e in log_events(self.victim, "provider_attempt") if e.get("ok")}
        self.facts.update({
            "held": len(self.held), "rejected_late_writes": len(rejected),
            "skipped_sends": sum(1 for e in events if e.get("event") == "send_skipped_lease"),
            "sent_by_victim_before_the_pause": len(set(self.held) & taken),
            "stub_sent_but_recorded_failed": sum(
                1 for r in rows if str(r[0]) in taken and r[1] == "stub" and r[2] == "failed"),
            "file_sent_twice": sum(1 for r in rows if str(r[0]) in taken and r[1] == "file" and r[4] == 1),
            # ... and those it never handed over, whose one attempt (stub allows one) was used up all the same:
            "stub_never_sent_but_failed": sum(
                1 for r in rows if str(r[0]) not in taken and r[1] == "stub" and r[2] == "failed")})
