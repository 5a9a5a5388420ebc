"""``python -m bench.loadgen SPEC.json``: an HTTP load generator; prints a JSON summary on stdout.

Why a small asyncio + aiohttp client rather than a dedicated tool: wrk and its kin are not installed here and
nothing may be downloaded for a benchmark, while aiohttp is already in the virtualenv; it keeps HTTP/1.1
connections alive (one per concurrent worker, like a real client pool), and it times every request on its own
(``time.perf_counter`` around the whole exchange), so the percentiles are exact rather than histogram
approximations.  It runs in a process of its own so that its CPU use is measured apart (``client_cpu``) and
never shares an event loop with the server under test.

Two modes:

- closed loop (``rate`` unset): ``concurrency`` workers, each sending its next request as soon as the previous
  one is answered, for ``warmup`` + ``duration`` seconds; only requests started after the warm-up count;
- open loop (``rate`` set): requests start on a fixed schedule, ``rate`` per second, whatever the answers do, with
  at most ``concurrency`` outstanding (a start that would exceed it is counted as ``dropped``).

Either mode also stops after ``count`` requests when given.  With ``watch_pid`` (the server under test), the
CPU share that process used while measuring is reported as ``server_cpu``, next to the machine's
(``machine_busy``, all cores together, 1.0 = every core busy) and the load generator's own (``client_cpu``,
1.0 = one core).  Bodies are templates: ``{seq}`` becomes the
request's sequence number and ``{seq6}`` the same, zero-padded to six digits.  Only 127.0.0.1 / localhost
targets are accepted.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.support import all_processes_cpu, machine_cpu, percentile, process_cpu_seconds

LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Spec:  # pylint: disable=too-many-instance-attributes
    """What to send, how hard and for how long."""

    base_url: str
    method: str = "GET"
    paths: tuple[str, ...] = ("/",)
    headers: dict[str, str] = field(default_factory=dict)
    bodies: tuple[str, ...] = ()
    concurrency: int = 1
    duration: float = 10.0
    warmup: float = 0.0
    rate: float | None = None
    count: int | None = None
    timeout: float = 5.0
    records: str | None = None
    first_seq: int = 0
    watch_pid: int | None = None
    db_name: str | None = None

    @classmethod
    def load(cls, path: Path) -> Spec:
        """Read a spec from a JSON file, refusing any target but this machine."""
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        raw["paths"] = tuple(raw.get("paths", ("/",)))
        raw["bodies"] = tuple(raw.get("bodies", ()))
        spec = cls(**raw)
        host = urllib.parse.urlsplit(spec.base_url).hostname
        if host not in LOCAL_HOSTS:
            raise ValueError(f"refusing to load {spec.base_url}: only {', '.join(LOCAL_HOSTS)} are allowed")
        if spec.concurrency < 1 or spec.duration <= 0 or (spec.rate is not None and spec.rate <= 0):
            raise ValueError("concurrency >= 1, duration > 0 and rate > 0 are required")
        return spec


@dataclass
class Tally:
    """Latencies and outcomes of the requests that count."""

    latencies: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    max_lag: float = 0.0
    loop_lags: list[float] = field(default_factory=list)

    def add(self, latency: float, status: int, code: str | None) -> None:
        """Count one answer (status 0: no answer, ``code`` then names the exception)."""
        self.latencies.append(latency)
        if 200 <= status < 300:
            self.ok_latencies.append(latency)
        failed = status == 0 or (status >= 400 and code is not None)
        self.outcomes[f"{status}:{code}" if failed else str(status)] += 1

    def summary(self, spec: Spec, elapsed: float, cpu: dict[str, Any]) -> dict[str, Any]:
        """The JSON summary of a run that measured for ``elapsed`` seconds, with the CPU shares in ``cpu``."""
        ok = len(self.ok_latencies)
        return {
            "mode": "open" if spec.rate else "closed", "method": spec.method, "concurrency": spec.concurrency,
            "rate": spec.rate, "duration": round(elapsed, 3), "requests": len(self.latencies), "ok": ok,
            "throughput": round(len(self.latencies) / elapsed, 1) if elapsed > 0 else 0.0,
            "ok_throughput": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
            "latency_ms": latency_summary(self.latencies), "ok_latency_ms": latency_summary(self.ok_latencies),
            "over_1s": sum(1 for v in self.latencies if v > 1.0),
            "outcomes": dict(sorted(self.outcomes.items())), "dropped": self.dropped,
            "max_schedule_lag_ms": round(self.max_lag * 1000, 1),
            "client_loop_lag_ms": {"p99": round(percentile(self.loop_lags, 0.99) * 1000, 1),
                                   "max": round(max(self.loop_lags, default=0.0) * 1000, 1)}, **cpu,
        }


def latency_summary(values: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean, in milliseconds."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    return {"p50": round(percentile(values, 0.50) * 1000, 2), "p90": round(percentile(values, 0.90) * 1000, 2),
            "p99": round(percentile(values, 0.99) * 1000, 2), "max": round(max(values) * 1000, 2),
            "mean": round(sum(values) / len(values) * 1000, 2)}


def cpu_seconds() -> float:
    """CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuMark:
    """CPU counters at one moment: wall clock, this process, the watched process, the machine, every process."""

    wall: float
    client: float
    server: float
    busy: float
    total: float
    processes: dict[int, tuple[float, str]]

    @classmethod
    def now(cls, watch_pid: int | None) -> CpuMark:
        """The counters now."""
        busy, total = machine_cpu()
        server = process_cpu_seconds(watch_pid) if watch_pid else 0.0
        return cls(time.monotonic(), cpu_seconds(), server, busy, total, all_processes_cpu())

    def shares(self, later: CpuMark, spec: Spec) -> dict[str, Any]:
        """CPU shares between this mark and ``later``.

        ``other_cpu`` is the machine's busy time (in cores) minus what this client, the server under test and
        the PostgreSQL backends of ``spec.db_name`` (and PostgreSQL's background processes) used: work that does
        not belong to the measurement and competes with it, including processes that came and went meanwhile.
        """
        wall = max(1e-9, later.wall - self.wall)
        total = max(1e-9, later.total - self.total)
        client = later.client - self.client
        server = later.server - self.server
        ours = 0.0
        others: list[tuple[float, str]] = []
        for pid, (seconds, cmdline) in later.processes.items():
            used = seconds - self.processes.get(pid, (0.0, ""))[0]  # a process born meanwhile counts whole
            if used <= 0 or pid in (os.getpid(), spec.watch_pid):
                continue
            if _ours(cmdline, spec.db_name):
                ours += used
            else:
                others.append((used, cmdline[:60]))
        others.sort(reverse=True)
        busy_cores = (later.busy - self.busy) / wall
        return {"client_cpu": round(client / wall, 3), "server_cpu": round(server / wall, 3),
                "database_cpu": round(ours / wall, 3), "machine_busy": round((later.busy - self.busy) / total, 3),
                "other_cpu": round(max(0.0, busy_cores - (client + server + ours) / wall), 3),
                "top_other": [f"{o[1]} ({o[0] / wall:.2f})" for o in others[:3]]}


def _ours(cmdline: str, db_name: str | None) -> bool:
    """A PostgreSQL backend of the database under test, or one of PostgreSQL's background processes."""
    if not cmdline.startswith("postgres:"):
        return False
    backend = "[local]" in cmdline or "(" in cmdline  # a client's session: unix socket or host(port)
    return (db_name is not None and f" {db_name} " in cmdline) or not backend


class LoadGenerator:
    """Sends the requests of one :class:`Spec` and tallies the answers."""

    def __init__(self, spec: Spec, session: aiohttp.ClientSession) -> None:
        """Send through ``session``."""
        self.spec = spec
        self.session = session
        self.tally = Tally()
        self.next_seq = spec.first_seq
        self.issued = 0
        self.marks: list[CpuMark] = []

    def mark(self) -> None:
        """Take CPU counters (at the start and at the end of the measured part)."""
        self.marks.append(CpuMark.now(self.spec.watch_pid))

    async def watch_loop(self) -> None:
        """Record how late a 10 ms sleep wakes up: the client's own delay, which inflates what it measures."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.tally.loop_lags.append(max(0.0, loop.time() - before - 0.01))

    def cpu_shares(self) -> dict[str, Any]:
        """CPU shares over the measured part."""
        if len(self.marks) < 2:
            return {}
        return self.marks[0].shares(self.marks[-1], self.spec)

    def _take_seq(self) -> int | None:
        """The next sequence number, or None once ``count`` requests have been issued."""
        if self.spec.count is not None and self.issued >= self.spec.count:
            return None
        self.issued += 1
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def body(self, seq: int) -> str | None:
        """The body of request ``seq`` (None without body templates)."""
        if not self.spec.bodies:
            return None
        return self.spec.bodies[seq % len(self.spec.bodies)].replace("{seq6}", f"{seq:06d}").replace("{seq}", str(seq))

    async def one(self, seq: int, counted: bool) -> None:
        """Send request ``seq`` and record its outcome (when ``counted``)."""
        spec = self.spec
        url = spec.base_url + spec.paths[seq % len(spec.paths)]
        wall = time.time()
        started = time.perf_counter()
        code = message_id = None
        try:
            async with self.session.request(spec.method, url, data=self.body(seq), headers=spec.headers) as response:
                raw = await response.read()
                status = response.status
            if status >= 400 or spec.records:
                code, message_id = _code_and_id(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            status, code = 0, type(exc).__name__
        latency = time.perf_counter() - started
        if counted:
            self.tally.add(latency, status, code)
            if spec.records:
                self.tally.records.append({"seq": seq, "t": wall, "latency": round(latency, 6), "status": status,
                                           "code": code, "id": message_id})

    async def closed_loop(self) -> float:
        """Workers that each send back to back; returns the measured seconds."""
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + self.spec.warmup
        end = measure_from + self.spec.duration
        loop.call_at(measure_from, self.mark)

        async def worker() -> None:
            """Send back to back until the end of the step."""
            while loop.time() < end:
                seq = self._take_seq()
                if seq is None:
                    return
                await self.one(seq, counted=loop.time() >= measure_from)

        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))
        self.mark()
        if self.spec.count is not None:
            return max(1e-9, loop.time() - measure_from)
        return self.spec.duration

    async def open_loop(self) -> float:
        """Requests on a fixed schedule; returns the measured seconds."""
        loop = asyncio.get_running_loop()
        assert self.spec.rate is not None
        start = loop.time()
        end = start + self.spec.duration
        self.mark()
        tasks: set[asyncio.Task[None]] = set()
        index = 0
        while True:
            target = start + index / self.spec.rate
            if target >= end:
                break
            index += 1
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.tally.max_lag = max(self.tally.max_lag, loop.time() - target)
            if len(tasks) >= self.spec.concurrency:
                self.tally.dropped += 1
                continue
            seq = self._take_seq()
            if seq is None:
                break
            task = asyncio.create_task(self.one(seq, counted=True))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks))
        self.mark()
        return max(1e-9, min(loop.time() - start, self.spec.duration))


def _code_and_id(raw: bytes) -> tuple[str | None, str | None]:
    """The problem ``code`` and the message ``id`` of a JSON answer, when it has them."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    code, message_id = data.get("code"), data.get("id")
    return (str(code) if code is not None else None), (str(message_id) if message_id is not None else None)


async def run(spec: Spec) -> dict[str, Any]:
    """Run ``spec`` and return the summary (records, when asked for, are written to their file)."""
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=spec.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:
        generator = LoadGenerator(spec, session)
        watcher = asyncio.create_task(generator.watch_loop())
        try:
            elapsed = await (generator.open_loop() if spec.rate else generator.closed_loop())
        finally:
            watcher.cancel()
    if spec.records:
        with open(spec.records, "w", encoding="utf-8") as out:
            for record in generator.tally.records:
                out.write(json.dumps(record) + "\n")
    return generator.tally.summary(spec, elapsed, generator.cpu_shares())


def main(argv: list[str]) -> int:
    """Entry point: one argument, the spec file."""
    if len(argv) != 1:
        print("usage: python -m bench.loadgen SPEC.json", file=sys.stderr)
        return 2
    summary = asyncio.run(run(Spec.load(Path(argv[0]))))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
