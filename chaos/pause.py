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

from bench.support import wait_until
from chaos.harness import LEASE_SECONDS, Outcome, Stage, final_state_checks, log_events
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
    rng = random.Random(11)
    totals: dict[str, int] = {"held": 0, "reclaimed": 0, "rejected_late_writes": 0, "skipped_sends": 0,
                              "sent_by_rescuer_during_pause": 0}
    with Stage(admin_dsn, "pause", workdir) as stage:
        for cycle in range(cycles):
            stage.rows(QUEUE_SQL, {"offset": cycle * per_cycle, "count": per_cycle})
            facts = _cycle(stage, outcome, cycle, rng)
            for key in totals:
                totals[key] += int(facts.get(key, 0))
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


def _cycle(stage: Stage, outcome: Outcome, cycle: int, rng: random.Random) -> dict[str, Any]:
    """One pause-and-resume cycle; checks recorded in ``outcome``; returns the cycle's numbers."""
    victim = stage.dispatcher(f"victim-{cycle}", wait=True)
    before = int(stage.value("SELECT count(*) FROM attempts"))
    wait_until(lambda: int(stage.value("SELECT count(*) FROM attempts")) > before + 10, 20, 0.02)
    held = _catch_holding(stage, victim.send, rng)
    label = f"cycle {cycle + 1}"
    if not outcome.check(f"{label}: the victim was paused while holding claims", bool(held)):
        victim.stop()
        return {}
    paused_at = time.monotonic()
    sent_before = int(stage.value("SELECT count(*) FROM messages WHERE send_status = 'sent'"))
    rescuer = stage.dispatcher(f"rescuer-{cycle}")

    def reclaimed() -> bool:
        now = {str(r[0]): str(r[1]) for r in stage.rows(
            "SELECT id, claim_token FROM messages WHERE id = ANY(%s::uuid[])", (list(held),))}
        return all(now[i] != token for i, token in held.items())

    taken = wait_until(reclaimed, LEASE_SECONDS + 15, 0.1)
    during = int(stage.value("SELECT count(*) FROM messages WHERE send_status = 'sent'")) - sent_before
    paused_for = time.monotonic() - paused_at
    outcome.check(f"{label}: the rescuer took over every message the paused victim held", taken,
                  f"{len(held)} held, paused {paused_for:.1f} s (lease {LEASE_SECONDS:g} s)")
    victim.send(signal.SIGCONT)

    def victim_answered() -> bool:
        ids = {e.get("message_id") for e in log_events(victim, *REJECTED_EVENTS)}
        return set(held) <= ids

    answered = wait_until(victim_answered, 10, 0.1)
    stage.wait_finished(20)
    codes = (victim.stop(), rescuer.stop())
    events = log_events(victim, *REJECTED_EVENTS)
    rejected_ids = {e.get("message_id") for e in events}
    outcome.check(f"{label}: every late write of the resumed victim was rejected or not attempted", answered,
                  f"{len(set(held) & rejected_ids)}/{len(held)} held messages logged as 'claim lost; late write "
                  "rejected' or 'lease too short to send'")
    closed = stage.rows("""
        SELECT a.message_id, a.result, a.error, a.number FROM attempts a
        WHERE a.message_id = ANY(%s::uuid[]) ORDER BY a.message_id, a.number""", (list(held),))
    abandoned = {str(r[0]) for r in closed if r[2] == ABANDONED_ERROR}
    outcome.check(f"{label}: the victim's attempts were closed as abandoned by the rescuer", set(held) <= abandoned,
                  f"{len(set(held) & abandoned)}/{len(held)}")
    outcome.check(f"{label}: both dispatchers exit 0 on SIGTERM", codes == (0, 0), f"exit codes {codes}")
    return {"held": len(held), "reclaimed": len(held) if taken else 0,
            "rejected_late_writes": sum(1 for e in events if e.get("event") == "stale_write_rejected"),
            "skipped_sends": sum(1 for e in events if e.get("event") == "send_skipped_lease"),
            "sent_by_rescuer_during_pause": during}
