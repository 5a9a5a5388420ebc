"""kill -9: dispatchers killed every few hundred milliseconds (and restarted) while messages flow in.

Two replicas run; each is killed with SIGKILL a random 0.1-0.5 s after it has logged its start, and replaced at
once.  Meanwhile the API takes a steady stream of POSTs (file to even and odd numbers, stub).  Then the last
victims are killed, one healthy dispatcher finishes everything, and the final state is checked: every message
finished, attempts within the provider's limit, no ``sending`` row and no open attempt, one file at least per
file message sent, nothing accepted lost.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

from bench.support import Child
from chaos.harness import (HEADERS, LEASE_SECONDS, MIXED_BODIES, Outcome, Stage, accepted_checks, describe,
                           final_state_checks)

STARTED = "dispatcher started"


class Killer:
    """Replicas that are each SIGKILLed a random 0.1-0.5 s after they log their start, and replaced at once."""

    def __init__(self, stage: Stage, replicas: int, seed: int = 7) -> None:
        """Start ``replicas`` victims."""
        self.stage = stage
        self.rng = random.Random(seed)
        self.victims: list[Child] = [stage.dispatcher(f"victim-{i}") for i in range(replicas)]
        self.kill_at: list[float | None] = [None] * replicas
        self.kills = 0
        self.started = 0

    def tick(self) -> None:
        """Schedule the kill of each victim that has started, kill those whose time has come."""
        now = time.monotonic()
        for i, victim in enumerate(self.victims):
            when = self.kill_at[i]
            if when is None:
                if STARTED in victim.log_text():
                    self.kill_at[i] = now + self.rng.uniform(0.1, 0.5)
                    self.started += 1
                elif now - victim.started > 5:
                    self.kill_at[i] = now  # never got going: replace it anyway
            elif now >= when:
                victim.kill9()
                self.kills += 1
                self.victims[i] = self.stage.dispatcher(f"victim-{i}")
                self.kill_at[i] = None

    def run(self, load_done: Callable[[], bool], min_seconds: float, bound: float) -> float:
        """Kill and replace until the load is done and ``min_seconds`` have passed (at most ``bound`` seconds);
        then kill the last victims.  Returns the seconds it took."""
        began = time.monotonic()
        while time.monotonic() - began < bound and not (load_done() and time.monotonic() - began >= min_seconds):
            self.tick()
            time.sleep(0.02)
        for victim in self.victims:
            victim.kill9()
        return time.monotonic() - began


def run(admin_dsn: str, workdir: Path, *, messages: int, rate: float, min_seconds: float,
        replicas: int = 2, name: str = "kill", strict: bool = True) -> Outcome:
    """Kill and restart ``replicas`` dispatchers for at least ``min_seconds`` while ``messages`` are POSTed.

    Not ``strict`` (the smoke run inside ``make test``): only the final-state invariants are checks; whether every
    POST came within 1 s and whether a kill hit a dispatcher holding work (both at the mercy of a busy machine,
    and of chance on a short run) are reported as facts.
    """
    outcome = Outcome(name, f"kill -9 a dispatcher every few hundred ms ({messages} messages)")
    outcome.notes += describe(__doc__)
    with Stage(admin_dsn, name, workdir) as stage:
        url = stage.api()[1]
        load = stage.load(name, base_url=url, method="POST", paths=["/api/v1/messages"], headers=HEADERS,
                          bodies=MIXED_BODIES, rate=rate, count=messages, duration=messages / rate + 2,
                          concurrency=64, timeout=5.0)
        killer = Killer(stage, replicas)
        outcome.facts["kill_seconds"] = round(killer.run(load.done, min_seconds, min_seconds + messages / rate + 30), 1)
        outcome.facts.update({"kills": killer.kills,
                              "victims_that_logged_their_start": killer.started})
        summary, records = load.result()
        _recover_and_check(stage, outcome, summary, records, strict)
    return outcome


def _recover_and_check(stage: Stage, outcome: Outcome, summary: dict[str, Any], records: list[dict[str, Any]],
                       strict: bool) -> None:
    """Let one healthy dispatcher finish everything, then check the final state."""
    in_flight = stage.rows("SELECT (SELECT count(*) FROM messages WHERE send_status = 'sending'), "
                           "(SELECT count(*) FROM attempts WHERE finished_at IS NULL)")[0]
    healthy = stage.dispatcher("healthy", wait=True)
    finished = stage.wait_finished(LEASE_SECONDS + 60)
    code = healthy.stop()
    outcome.facts.update({"posts": summary["requests"], "post_outcomes": summary["outcomes"],
                          "sending_after_last_kill": in_flight[0], "open_attempts_after_last_kill": in_flight[1]})
    refused = {k: v for k, v in summary["outcomes"].items() if k != "201"}
    outcome.check("every POST answered 201 or 503 while dispatchers died",
                  all(k == "201" or k.startswith("503:") for k in summary["outcomes"]),
                  f"{summary['outcomes'].get('201', 0)} × 201" + (f", refused: {refused}" if refused else ""))
    slowest = f"slowest {summary['latency_ms']['max']:.0f} ms"
    if strict:
        outcome.check("every POST answered within 1 s", summary["over_1s"] == 0, slowest)
    else:
        outcome.facts["slowest_post"] = slowest
    outcome.check("one healthy dispatcher finishes everything", finished,
                  f"{stage.unfinished()} message(s) still unfinished" if not finished else "")
    outcome.check("the healthy dispatcher stops cleanly on SIGTERM (exit 0)", code == 0, f"exit {code}")
    accepted_checks(stage, outcome, records)
    final_state_checks(stage, outcome)
    if strict:
        outcome.check("the kills hit dispatchers holding work (some attempts were abandoned)",
                      outcome.facts["abandoned_attempts"] > 0 or in_flight[0] > 0,
                      f"{outcome.facts['abandoned_attempts']} abandoned attempt(s)")
