"""``python -m bench [--quick] [--out PATH] [--keep-logs] [--from-json JSON]``: run the benchmarks, write the report.

The full run takes about six minutes and writes ``docs/benchmarks.md`` and ``docs/benchmarks.json``; ``--quick``
takes about a minute, prints the report and writes files only when ``--out`` names one.  The database is
``DATABASE_URL`` when set, else the embedded server in ``.data/postgres``; either way the run works in a fresh
database ``smsgate_bench_<pid>`` that it drops at the end, and it stops every process it started.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.report import environment, loadavg, render
from bench.runner import FULL, QUICK, Runner, setup_logging
from bench.support import Children, ScratchDatabase, database_server, dump_json, signals_as_exit
from common.settings import PROJECT_ROOT

log = logging.getLogger("bench")
DEFAULT_OUT = PROJECT_ROOT / "docs" / "benchmarks.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short steps (about a minute), for a smoke check")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default: docs/benchmarks.md for a full run, none for --quick); "
                             "the raw numbers go next to it as .json")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and the load specs")
    parser.add_argument("--from-json", type=Path, default=None, metavar="JSON",
                        help="run nothing: render the report again from the raw numbers of an earlier run")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run, report; 0 when every step ran, 1 when one failed."""
    args = parse_args(argv)
    setup_logging()
    if args.from_json is not None:
        report = render(json.loads(args.from_json.read_text(encoding="utf-8")))
        (args.out or args.from_json.with_suffix(".md")).write_text(report, encoding="utf-8")
        return 0
    plan = QUICK if args.quick else FULL
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    workdir = Path(tempfile.mkdtemp(prefix="smsgate-bench-"))
    started = time.monotonic()
    server = database_server()
    env = environment(server.admin_dsn, server.source)
    log.info("%s run on %s; logs in %s", plan.name, server.source, workdir)
    try:
        with signals_as_exit(), ScratchDatabase(server.admin_dsn, f"smsgate_bench_{os.getpid()}") as db, \
                Children(workdir) as kids:
            results = Runner(plan, db, kids, workdir).run_all()
    finally:
        if args.keep_logs:
            log.info("logs kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    env["loadavg_after"] = loadavg()
    results["environment"] = env
    results["total_seconds"] = round(time.monotonic() - started, 1)
    report = render(results)
    if out is None:
        print(report)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding="utf-8")
        dump_json(out.with_suffix(".json"), results)
        log.info("wrote %s and %s", out, out.with_suffix(".json"))
    log.info("done in %.0f s", results["total_seconds"])
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
