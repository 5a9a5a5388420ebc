"""``python -m chaos [--quick | --smoke] [--only NAME] [--out PATH] [--keep-logs]``: chaos runs; non-zero on failure.

- default (about 3 minutes, at most 5): every scenario at full size; writes ``docs/chaos.md``;
- ``--quick`` (under a minute): every scenario, smaller; prints the report (``--out`` to write it);
- ``--smoke`` (about 10 s): the kill -9 invariant on 200 messages only, for ``make test``; prints a summary.

The database is ``DATABASE_URL`` when set, else the embedded server in ``.data/postgres``; each scenario works in
a database of its own, dropped at the end.  The outage scenario needs a server it may stop: it starts a private
embedded PostgreSQL in a temporary folder (never the shared one), and is skipped when ``DATABASE_URL`` is set.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.support import database_server, signals_as_exit
from chaos import kill, outage, pause, timezones
from chaos.harness import Outcome
from chaos.report import render, summary_lines
from common.settings import PROJECT_ROOT

log = logging.getLogger("chaos")
DEFAULT_OUT = PROJECT_ROOT / "docs" / "chaos.md"
NAMES = ("kill", "pause", "outage", "timezone")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every scenario, smaller (under a minute)")
    size.add_argument("--smoke", action="store_true", help="kill -9 on 200 messages only (about 10 s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default: docs/chaos.md for a full run, none otherwise)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and files")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only this scenario (repeatable)")
    return parser.parse_args(argv)


def scenarios(args: argparse.Namespace, admin_dsn: str, embedded: bool,
              workdir: Path) -> list[Callable[[], Outcome]]:
    """The scenarios to run, in order, sized for the mode."""
    if args.smoke:
        return [lambda: kill.run(admin_dsn, workdir, messages=200, rate=50, min_seconds=5, name="kill_smoke",
                                 strict=False)]
    quick = args.quick
    every = {
        "kill": lambda: kill.run(admin_dsn, workdir, messages=300 if quick else 1000, rate=100,
                                 min_seconds=5 if quick else 15),
        "pause": lambda: pause.run(admin_dsn, workdir, cycles=1 if quick else 3, per_cycle=400 if quick else 600),
        "outage": lambda: outage.run(workdir, embedded=embedded, quick=quick),
        "timezone": lambda: timezones.run(admin_dsn, workdir,
                                          database_zones=("UTC",) if quick else ("UTC", "America/St_Johns")),
    }
    return [run for name, run in every.items() if not args.only or name in args.only]


def run_all(runs: list[Callable[[], Outcome]]) -> list[Outcome]:
    """Run each scenario; a crash counts as a failed scenario, and the others still run."""
    outcomes = []
    for scenario in runs:
        began = time.monotonic()
        try:
            outcome = scenario()
        except Exception as exc:  # pylint: disable=broad-exception-caught  # a crash is a failed scenario
            log.exception("scenario crashed")
            outcome = Outcome("crashed", "a scenario crashed")
            outcome.check("the scenario ran to its end", False, f"{type(exc).__name__}: {exc}")
        outcome.seconds = round(time.monotonic() - began, 1)
        outcomes.append(outcome)
        for line in summary_lines([outcome]):
            log.info("%s", line)
    return outcomes


def main(argv: list[str]) -> int:
    """Run the scenarios; 0 when every invariant held, 1 otherwise."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s chaos: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    workdir = Path(tempfile.mkdtemp(prefix="smsgate-chaos-"))
    started = time.monotonic()
    server = database_server()
    outcomes: list[Outcome] = []
    try:
        with signals_as_exit():
            outcomes = run_all(scenarios(args, server.admin_dsn, server.embedded, workdir))
    finally:
        if args.keep_logs or not all(o.ok for o in outcomes):
            log.info("logs kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    out = args.out if args.out is not None else (DEFAULT_OUT if mode == "full" else None)
    report = render(outcomes, mode, server.source, time.monotonic() - started)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
        log.info("wrote %s", out)
    elif mode == "quick":
        print(report)
    ok = all(o.ok for o in outcomes)
    log.info("%s in %.0f s: %s", mode, time.monotonic() - started, "every invariant held" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
