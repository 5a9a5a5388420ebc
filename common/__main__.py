"""``python -m common dsn|migrate|run``.

- ``dsn``: print the database address (starting the embedded PostgreSQL when ``DATABASE_URL`` is unset);
- ``migrate``: apply ``schema.sql`` to it;
- ``run``: migrate, then run the API and one dispatcher as child processes until Ctrl-C or SIGTERM, which are
  passed on to both so that each stops cleanly; a child that crashes is started again (see :func:`supervise`);
- ``stop-db``: stop the embedded PostgreSQL (it keeps running between ``make run``s, for a quick start).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

from common.database import apply_schema, resolve_dsn, stop_embedded
from common.providers import ProviderConfigError, build_providers
from common.settings import SettingsError, load_settings
from common.signals import SUPERVISED, die_with_parent

USAGE = "usage: python -m common dsn|migrate|run|stop-db"
CHILDREN = ("api", "dispatcher")
RESTART_LIMIT = 5      # run gives up at this crash of one child within RESTART_WINDOW
RESTART_WINDOW = 60.0  # seconds


def main(argv: list[str]) -> int:
    """Run one command; returns the exit status."""
    if len(argv) != 1 or argv[0] not in ("dsn", "migrate", "run", "stop-db"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        if argv[0] == "stop-db":
            stopped = stop_embedded(settings.data_dir / "postgres")
            print(f"smsgate: embedded PostgreSQL {'stopped' if stopped else 'was not running'}", file=sys.stderr)
            return 0
        if argv[0] == "run":
            build_providers(settings)  # what the children would refuse, refused here, before anything starts
        dsn = resolve_dsn(settings)
    except (SettingsError, ProviderConfigError) as exc:
        print(f"smsgate: {exc}", file=sys.stderr)
        return 2
    if argv[0] == "dsn":
        print(dsn)
        return 0
    apply_schema(dsn)
    print("smsgate: schema applied", file=sys.stderr)
    if argv[0] == "migrate":
        return 0
    return supervise(dsn, f"http://{settings.api.host}:{settings.api.port}")


def supervise(dsn: str, url: str) -> int:
    """Run the API and a dispatcher against ``dsn`` until a signal; restart one that crashes.

    A child that exits by itself is started again (a dispatcher killed mid-send loses nothing: its claims are
    reclaimed when their lease ends), unless it refused its settings (exit status 2) or has crashed
    ``RESTART_LIMIT`` times within ``RESTART_WINDOW`` seconds: then both stop and ``run`` fails with its status.
    If this process's own parent dies (``make run`` killed), it gets SIGTERM and stops both as for a Ctrl-C.
    """
    die_with_parent()
    env = dict(os.environ, DATABASE_URL=dsn, **{SUPERVISED: "1"})

    def start(name: str) -> subprocess.Popen[bytes]:
        # It lives until the end of supervise() (waited for below); this process has one thread, so preexec_fn
        # is safe.
        # pylint: disable-next=consider-using-with,subprocess-popen-preexec-fn
        return subprocess.Popen([sys.executable, "-m", name], env=env, preexec_fn=die_with_parent)

    procs = {name: start(name) for name in CHILDREN}
    crashes: dict[str, list[float]] = {name: [] for name in CHILDREN}
    stopping = False
    failed = 0

    def forward(_signum: int, _frame: FrameType | None) -> None:
        # One SIGTERM each, whatever came and however often (the children ignore the terminal's SIGINT): a
        # second signal would only race with their clean exit.
        nonlocal stopping
        if stopping:
            return
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"smsgate: running the API on {url} and a dispatcher; Ctrl-C stops both", file=sys.stderr)
    while not stopping and not failed:
        time.sleep(0.2)
        for name, proc in list(procs.items()):
            code = proc.poll()
            if code is None or stopping:
                continue
            now = time.monotonic()
            crashes[name] = [t for t in crashes[name] if now - t < RESTART_WINDOW] + [now]
            if code == 2 or len(crashes[name]) >= RESTART_LIMIT:
                print(f"smsgate: {name} exited with status {code}; stopping", file=sys.stderr)
                failed = abs(code) or 1
                break
            print(f"smsgate: {name} exited with status {code}; starting it again", file=sys.stderr)
            procs[name] = start(name)
    if failed:  # stop the other
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
    codes = []
    for proc in procs.values():
        try:
            codes.append(proc.wait(timeout=30))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    if failed:
        return failed
    # A child stopped by our own SIGTERM reports -15 (or 0 when it handled it): both mean a clean stop.
    return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else max(map(abs, codes))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
