"""The commands of the contract as separate processes: migrate, dsn, the API, the dispatcher, and `run`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from common.settings import PROJECT_ROOT


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ...`` in the project root and wait for it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """One request with the standard library; (status, parsed JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": "SMSAUTH:cli", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_dsn_and_migrate(dsn: str) -> None:
    """`dsn` prints the configured address; `migrate` applies the schema again without harm."""
    assert run(["common", "dsn"], DATABASE_URL=dsn).stdout.strip() == dsn
    migrated = run(["common", "migrate"], DATABASE_URL=dsn)
    assert migrated.returncode == 0 and "schema applied" in migrated.stderr
    assert run(["common", "bogus"]).returncode == 2


@pytest.mark.parametrize("module", ["api", "dispatcher", "common"])
def test_bad_settings_stop_start_up_with_a_message(module: str) -> None:
    """A wrong setting: exit status 2 and one line naming it, no traceback."""
    args = [module, "dsn"] if module == "common" else [module]
    result = run(args, SMSGATE_API__PORT="eighty")
    assert result.returncode == 2
    assert "api.port must be int" in result.stderr and "Traceback" not in result.stderr


def test_run_serves_sends_and_stops_cleanly_on_sigterm(dsn: str, tmp_path: Path) -> None:
    """`python -m common run`: the API answers, the dispatcher sends, SIGTERM stops both with status 0."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "SENT_SMS_DIR": str(tmp_path)}
    with subprocess.Popen([sys.executable, "-m", "common", "run"], cwd=PROJECT_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            exercise_and_stop(proc, f"http://127.0.0.1:{port}", tmp_path)
        finally:
            if proc.poll() is None:  # a failed assertion must not leave the service running on the test database
                proc.kill()
                proc.wait()


def exercise_and_stop(proc: subprocess.Popen[bytes], base: str, sent_dir: Path) -> None:
    """Wait for the service, send one SMS through the file provider, then SIGTERM it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if http("GET", base + "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the service did not start"
        time.sleep(0.1)
    status, msg = http("POST", base + "/api/v1/messages",
                       {"phone": "+79991234568", "text": "cli", "provider": "file"})
    assert status == 201
    while http("GET", f"{base}/api/v1/messages/{msg['id']}")[1]["send_status"] != "sent":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(list(sent_dir.iterdir())) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_a_provider_setting_no_provider_knows_stops_run_before_anything_starts(dsn: str) -> None:
    """`run` refuses what its children would refuse (a misspelt provider key) before it applies the schema or
    starts them, with the key named."""
    result = run(["common", "run"], DATABASE_URL=dsn, SMSGATE_PROVIDERS__FILE__MAX_ATEMPTS="2")
    assert result.returncode == 2, result.stderr
    assert "max_atempts" in result.stderr and "Traceback" not in result.stderr
    assert "schema applied" not in result.stderr and "running" not in result.stderr


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (Linux's /proc)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii").split()]


def children_by_module(pid: int) -> dict[str, int]:
    """A process's live ``python -m <module>`` children, by module."""
    found = {}
    for kid in children_of(pid):
        try:
            args = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"-m" in args and not has_exited(kid):
            found[args[args.index(b"-m") + 1].decode()] = kid
    return found


def has_exited(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (an orphan's zombie is reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_api_and_dispatcher_stop_when_run_is_killed(dsn: str, tmp_path: Path) -> None:
    """`run` killed with SIGKILL cannot pass a stop on: its children get SIGTERM from the kernel and exit."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "SENT_SMS_DIR": str(tmp_path)}
    with subprocess.Popen([sys.executable, "-m", "common", "run"], cwd=PROJECT_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        kids: list[int] = []
        try:
            deadline = time.monotonic() + 30
            while len(kids := children_of(proc.pid)) < 2 or not answers(f"http://127.0.0.1:{port}/health"):
                assert time.monotonic() < deadline and proc.poll() is None, "the service did not start"
                time.sleep(0.1)
            kill_and_watch(proc, kids)
        finally:
            kill_leftovers(kids)


def kill_and_watch(parent: subprocess.Popen[bytes], family: list[int]) -> None:
    """SIGKILL ``parent``; then every pid of ``family`` must exit within 15 s."""
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while not all(has_exited(pid) for pid in family):
        assert time.monotonic() < deadline, "a process outlived its killed parent"
        time.sleep(0.05)


def kill_leftovers(pids: list[int]) -> None:
    """SIGKILL whatever of ``pids`` is still running (a failed test must not leave the service behind)."""
    for pid in pids:
        if not has_exited(pid):
            os.kill(pid, signal.SIGKILL)


def answers(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        return http("GET", url)[0] == 200
    except OSError:
        return False


def test_run_starts_a_crashed_dispatcher_again(dsn: str, tmp_path: Path) -> None:
    """A dispatcher killed with SIGKILL under `run` is replaced; the API stays up and the new one sends."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "SENT_SMS_DIR": str(tmp_path / "sent")}
    (tmp_path / "sent").mkdir()
    log = tmp_path / "run.log"
    with log.open("wb") as err, subprocess.Popen([sys.executable, "-m", "common", "run"], cwd=PROJECT_ROOT, env=env,
                                                 stdout=subprocess.DEVNULL, stderr=err) as proc:
        try:
            deadline = time.monotonic() + 30
            while len(first := children_by_module(proc.pid)) < 2 or not answers(base + "/health"):
                assert time.monotonic() < deadline and proc.poll() is None, "the service did not start"
                time.sleep(0.1)
            os.kill(first["dispatcher"], signal.SIGKILL)
            while len(now := children_by_module(proc.pid)) < 2 or now["dispatcher"] == first["dispatcher"]:
                assert time.monotonic() < deadline and proc.poll() is None, "no new dispatcher"
                time.sleep(0.05)
            assert now["api"] == first["api"]  # the same API process, still answering
            exercise_and_stop(proc, base, tmp_path / "sent")
            assert "dispatcher exited with status -9; starting it again" in log.read_text(encoding="utf-8")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_run_stops_when_its_own_parent_is_killed(dsn: str, tmp_path: Path) -> None:
    """`make run` killed with SIGKILL: `run` gets SIGTERM from the kernel and stops its children as for Ctrl-C."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "SENT_SMS_DIR": str(tmp_path)}
    # "; true" keeps the shell as the parent (it would exec a lone command), as make is in `make run`.
    with subprocess.Popen(["bash", "-c", f"'{sys.executable}' -m common run; true"], cwd=PROJECT_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as shell:
        family: list[int] = []
        try:
            deadline = time.monotonic() + 30
            while not (runs := children_of(shell.pid)) or len(children_of(runs[0])) < 2 \
                    or not answers(f"http://127.0.0.1:{port}/health"):
                assert time.monotonic() < deadline and shell.poll() is None, "the service did not start"
                time.sleep(0.1)
            family = [runs[0], *children_of(runs[0])]
            kill_and_watch(shell, family)
        finally:
            kill_leftovers(family)
