"""What the benchmark and chaos runs share: the database server, scratch databases, child processes, polling.

Everything here is synchronous: the orchestrating scripts only start processes, sleep, poll PostgreSQL and read
files, while the load itself comes from separate processes (:mod:`bench.loadgen`, the service, the baselines).
Every child process is registered in a :class:`Children` and stopped, by its own pid only, when the run ends.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Iterator, Mapping, Sequence

import psycopg2
import psycopg2.extensions

from common.database import apply_schema, create_database, embedded_dsn, with_database
from common.settings import PROJECT_ROOT

PYTHON = sys.executable
EMBEDDED_PGDATA = PROJECT_ROOT / ".data" / "postgres"
# Settings the service reads from the environment: a run starts its children from a clean slate.
SERVICE_ENV_NAMES = ("DATABASE_URL", "HOST", "PORT", "SENT_SMS_DIR", "LOG_LEVEL")
SERVICE_ENV_PREFIX = "SMSGATE_"


@dataclass(frozen=True)
class DatabaseServer:
    """The PostgreSQL server a run uses: an administrative DSN and where it came from."""

    admin_dsn: str
    source: str          # "DATABASE_URL" or "embedded"
    embedded: bool


def database_server() -> DatabaseServer:
    """``DATABASE_URL`` when set, else the embedded server in ``.data/postgres`` (started when needed)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return DatabaseServer(url, "DATABASE_URL", embedded=False)
    return DatabaseServer(embedded_dsn(EMBEDDED_PGDATA, database="postgres"), "embedded (.data/postgres)",
                          embedded=True)


Params = Sequence[Any] | Mapping[str, Any] | None


def execute(dsn: str, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit mode; its rows (none for statements without a result)."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description is not None else []
    finally:
        conn.close()


def scalar(dsn: str, sql: str, params: Params = None) -> Any:
    """The first column of the first row of a query (None when there is no row)."""
    rows = execute(dsn, sql, params)
    return rows[0][0] if rows else None


class ScratchDatabase:
    """A database of its own, with ``schema.sql`` applied, dropped on exit (``with ScratchDatabase(...) as db``)."""

    def __init__(self, admin_dsn: str, name: str) -> None:
        """A database called ``name`` on the server of ``admin_dsn``."""
        self.admin_dsn = admin_dsn
        self.name = name
        self.dsn = with_database(admin_dsn, name)

    def __enter__(self) -> ScratchDatabase:
        """Create the database (dropping a leftover of the same name first) and apply the schema."""
        self.drop()
        create_database(self.admin_dsn, self.name)
        apply_schema(self.dsn)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Drop the database, ending any session still on it."""
        self.drop()

    def drop(self) -> None:
        """``DROP DATABASE IF EXISTS ... WITH (FORCE)``."""
        execute(self.admin_dsn, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def service_environ(**values: str) -> dict[str, str]:
    """This process's environment without any smsgate setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items()
           if k not in SERVICE_ENV_NAMES and not k.startswith(SERVICE_ENV_PREFIX)}
    env.update(values)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    """A child process started by this run, with its combined stdout/stderr in ``log``."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def send(self, signum: int) -> None:
        """Send ``signum`` to this process (and only to it), if it still runs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def kill9(self) -> None:
        """SIGKILL, then reap it."""
        self.send(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGCONT (it may be paused), SIGTERM, wait up to ``timeout``; SIGKILL past it.  The exit status."""
        if self.alive():
            self.send(signal.SIGCONT)
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        code = self.proc.returncode
        assert code is not None
        return code

    def log_text(self) -> str:
        """What the process wrote so far."""
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines the process wrote so far (other lines are skipped)."""
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events


class Children:
    """Every process a run starts; :meth:`stop_all` ends those still running (``with Children(dir) as kids``)."""

    def __init__(self, log_dir: Path) -> None:
        """Logs of the children go to ``log_dir``."""
        self.log_dir = log_dir
        self.all: list[Child] = []
        self._counter = 0

    def __enter__(self) -> Children:
        """The registry itself."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Stop whatever still runs."""
        self.stop_all()

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Child:
        """Start ``python <args>`` in the project root with ``env``; output goes to a log file of its own."""
        self._counter += 1
        log = self.log_dir / f"{self._counter:03d}-{name}.log"
        with open(log, "wb") as out:
            # pylint: disable-next=consider-using-with  # the process outlives this call; stop_all() reaps it
            proc = subprocess.Popen([PYTHON, *args], cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        child = Child(name, proc, log)
        self.all.append(child)
        return child

    def stop_all(self) -> None:
        """Stop every child still running (SIGCONT, SIGTERM, then SIGKILL after a bound)."""
        for child in self.all:
            child.send(signal.SIGCONT)
            child.send(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.all:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill9()


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``check`` every ``step`` seconds until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def http_status(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> int:
    """The status of a GET to ``url`` (0 when no answer came)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec: 127.0.0.1 only
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """One JSON request with urllib: (status, decoded body or None)."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec: 127.0.0.1 only
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, None


def wait_http_ok(url: str, child: Child, timeout: float = 30.0) -> None:
    """Wait until GET ``url`` answers 200; fail early when ``child`` (the server) exits."""
    def ready() -> bool:
        """200 from ``url``; raises when the server has exited."""
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_text()[-2000:]}")
        return http_status(url, timeout=1.0) == 200
    if not wait_until(ready, timeout, step=0.1):
        raise RuntimeError(f"{child.name} did not answer {url} within {timeout:g}s:\n{child.log_text()[-2000:]}")


def wait_for_log(child: Child, text: str, timeout: float) -> bool:
    """Wait until ``text`` appears in the child's log; False when it does not within ``timeout`` or it exits."""
    return wait_until(lambda: text in child.log_text() or not child.alive(), timeout, 0.05) and text in child.log_text()


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (0.0 for no values); ``fraction`` in [0, 1]."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def all_processes_cpu() -> dict[int, tuple[float, str]]:
    """CPU seconds and command line of every process on the machine, by pid."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="ascii", errors="replace").rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        found[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / ticks, cmdline)
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


@contextlib.contextmanager
def signals_as_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit for the duration, so that ``finally`` blocks clean up."""
    def leave(signum: int, _frame: FrameType | None) -> None:
        """Exit with 128 + the signal number."""
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def postgres_version(dsn: str) -> str:
    """``SELECT version()`` of the server."""
    return str(scalar(dsn, "SELECT version()"))


def dump_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def psycopg_dsn_param(dsn: str, name: str) -> str | None:
    """One parameter of a DSN (``host``, ``dbname``, ...), None when absent."""
    value = psycopg2.extensions.parse_dsn(dsn).get(name)
    return None if value is None else str(value)
