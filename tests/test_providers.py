"""Providers: the registry, the file provider's names and exclusivity, the stub, the shared send() wrapper."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from common.domain import DeliveryStatus
from common.providers import (PermanentProviderError, Provider, ProviderConfigError, ProviderContext, ProviderError,
                              SendReceipt, Sms, build_providers, implementations, register)
from common.providers.file import FileProvider, write_exclusive
from common.settings import ProviderSettings
from tests.helpers import make_settings

WHEN = dt.datetime(2026, 12, 3, 18, 40, 22, 123456, tzinfo=dt.timezone.utc)


def make_sms(phone: str = "+79991234568", text: str = "hi", when: dt.datetime = WHEN) -> Sms:
    """One attempt's view of a message."""
    return Sms(message_id=uuid.uuid4(), phone=phone, text=text, attempt=1, started_at=when)


def file_provider(tmp_path: Path, **options: Any) -> FileProvider:
    """A file provider writing into tmp_path."""
    return FileProvider(ProviderSettings(name="file", type="file", options=options), ProviderContext(tmp_path))


def test_registry_finds_both_providers(tmp_path: Path) -> None:
    """Modules in common/providers register themselves; the settings choose which run."""
    assert {"file", "stub"} <= set(implementations())
    built = build_providers(make_settings(tmp_path, providers={"backup": {"type": "stub", "timeout": 1.0}}))
    assert list(built) == ["file", "stub", "backup"]
    assert built["backup"].name == "backup" and built["backup"].type_name == "stub"


def test_unknown_implementation_and_options_are_refused(tmp_path: Path) -> None:
    """A typo in type or in an option stops start-up."""
    with pytest.raises(ProviderConfigError, match="no implementation called 'carrier-pigeon'"):
        build_providers(make_settings(tmp_path, providers={"x": {"type": "carrier-pigeon"}}))
    with pytest.raises(ProviderConfigError, match="unknown setting"):
        build_providers(make_settings(tmp_path, providers={"stub": {"colour": "red"}}))
    with pytest.raises(ProviderConfigError, match="delivery_delay"):
        file_provider(tmp_path, delivery_delay=-1)
    with pytest.raises(ProviderConfigError, match="two provider implementations"):
        register("stub")(type("Other", (FileProvider,), {}))


async def test_file_provider_writes_the_contract_name(tmp_path: Path) -> None:
    """<ISO 8601 datetime>_<phone>.txt holding exactly the text; delivery checked after the delay."""
    provider = file_provider(tmp_path)
    receipt = await provider.send(make_sms(text="Hello\nworld"))
    assert receipt == SendReceipt(check_delivery_after=10.0)
    [path] = tmp_path.iterdir()
    assert path.name == "2026-12-03T18:40:22.123456+00:00_+79991234568.txt"
    assert dt.datetime.fromisoformat(path.name.split("_")[0]) == WHEN
    assert path.read_bytes() == b"Hello\nworld"


async def test_file_name_is_utc_whatever_the_offset_of_the_time_given(tmp_path: Path) -> None:
    """A time in another zone is written as the same instant in UTC."""
    tokyo = WHEN.astimezone(dt.timezone(dt.timedelta(hours=9)))
    await file_provider(tmp_path).send(make_sms(when=tokyo))
    [path] = tmp_path.iterdir()
    assert path.name.startswith("2026-12-03T18:40:22.123456+00:00_")


async def test_odd_numbers_fail_and_write_nothing(tmp_path: Path) -> None:
    """Odd last digit: a retryable ProviderError, no file."""
    with pytest.raises(ProviderError, match="odd") as info:
        await file_provider(tmp_path).send(make_sms(phone="+79991234567"))
    assert info.value.retryable
    assert not list(tmp_path.iterdir())


async def test_a_burst_in_one_microsecond_makes_distinct_files(tmp_path: Path) -> None:
    """Many sends to one number with the same time: one file each, none overwritten, names still ISO times."""
    provider = file_provider(tmp_path)
    await asyncio.gather(*[provider.send(make_sms(text=f"n{i}")) for i in range(50)])
    files = sorted(tmp_path.iterdir())
    assert len(files) == 50
    assert sorted(p.read_text() for p in files) == sorted(f"n{i}" for i in range(50))
    stamps = [dt.datetime.fromisoformat(p.name.split("_")[0]) for p in files]
    assert stamps[0] == WHEN and stamps[-1] == WHEN + dt.timedelta(microseconds=49)


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    """A file already at the name (from anyone) is left alone; no temporary file is left behind."""
    taken = tmp_path / "2026-12-03T18:40:22.123456+00:00_+79991234568.txt"
    taken.write_text("someone else's")
    path = write_exclusive(tmp_path, WHEN, "+79991234568", "mine")
    assert taken.read_text() == "someone else's"
    assert path.read_text() == "mine" and path != taken
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([taken.name, path.name])


def test_no_free_name_is_an_error(tmp_path: Path) -> None:
    """If every name were taken, the attempt fails instead of looping forever."""
    with mock.patch("common.providers.file.MAX_NAME_TRIES", 1), mock.patch("os.link", side_effect=FileExistsError):
        with pytest.raises(ProviderError, match="no free file name"):
            write_exclusive(tmp_path, WHEN, "+79991234568", "x")
    assert not list(tmp_path.iterdir())


async def test_file_delivery_is_reported_after_the_delay(tmp_path: Path) -> None:
    """Pending before sent_at + delay (with when to ask again), delivered at exactly that time after."""
    provider = file_provider(tmp_path, delivery_delay=10)
    early = await provider.check_delivery(uuid.uuid4(), WHEN, WHEN + dt.timedelta(seconds=4))
    assert (early.status, early.check_again_after) == (DeliveryStatus.PENDING, 6.0)
    late = await provider.check_delivery(uuid.uuid4(), WHEN, WHEN + dt.timedelta(seconds=12))
    assert (late.status, late.delivered_at) == (DeliveryStatus.DELIVERED, WHEN + dt.timedelta(seconds=10))


async def test_stub_accepts_and_cannot_report(tmp_path: Path) -> None:
    """stub: always accepted, no file, delivery unsupported."""
    stub = build_providers(make_settings(tmp_path))["stub"]
    assert await stub.send(make_sms(phone="+79991234567")) == SendReceipt()
    assert (await stub.check_delivery(uuid.uuid4(), WHEN, WHEN)).status is DeliveryStatus.UNSUPPORTED
    assert not stub.supports_delivery_reports and not list(tmp_path.iterdir())


class Broken(Provider):
    """Fails in the ways a provider can."""

    mode = "crash"

    async def _send(self, sms: Sms) -> SendReceipt:  # pylint: disable=unused-argument
        """Crash, hang or refuse, by mode."""
        if self.mode == "crash":
            raise KeyError("bug")
        if self.mode == "hang":
            await asyncio.sleep(10)
        raise PermanentProviderError()


@pytest.mark.parametrize(("mode", "reason", "retryable"), [
    ("crash", "provider error: KeyError", True),
    ("hang", "no answer within 0.05s", True),
    ("refuse", "The provider refused the message for good; retrying cannot help.", False),
])
async def test_send_wrapper_turns_every_failure_into_a_provider_error(tmp_path: Path, mode: str, reason: str,
                                                                      retryable: bool) -> None:
    """A crash, a hang past the timeout, a refusal: each a ProviderError with a short reason."""
    provider = Broken(ProviderSettings(name="broken", type="broken", timeout=0.05), ProviderContext(tmp_path))
    provider.mode = mode
    with pytest.raises(ProviderError) as info:
        await provider.send(make_sms())
    assert (info.value.reason, info.value.retryable) == (reason, retryable)


async def test_a_slow_disk_never_yields_a_file_for_a_failed_attempt(tmp_path: Path) -> None:
    """The write gives up before the file takes its name once the timeout is near, so an attempt that timed out
    never leaves a file behind (its retry would make a second one)."""
    provider = FileProvider(ProviderSettings(name="file", type="file", timeout=0.2), ProviderContext(tmp_path))
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        real_fsync(fd)
    with mock.patch("common.providers.file.os.fsync", side_effect=slow_fsync):
        with pytest.raises(ProviderError, match="no answer within 0.2s|in time"):
            await provider.send(make_sms())
        await asyncio.sleep(0.2)  # the thread has long finished
    assert not list(tmp_path.iterdir())


def test_stale_temporaries_are_cleaned_up(tmp_path: Path) -> None:
    """Temporary files left by a killed writer are removed when the provider starts; fresh ones are not."""
    stale, fresh = tmp_path / ".aaaa.tmp", tmp_path / ".bbbb.tmp"
    stale.write_text("half")
    fresh.write_text("being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    file_provider(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bbbb.tmp"]


def test_file_work_is_atomic_on_disk(tmp_path: Path) -> None:
    """The file appears under its final name only complete: it is written elsewhere and linked."""
    seen: list[bytes] = []
    real_link = os.link

    def spy(src: Any, dst: Any) -> None:
        seen.append(Path(src).read_bytes())
        assert not Path(dst).exists()
        real_link(src, dst)
    with mock.patch("os.link", side_effect=spy):
        write_exclusive(tmp_path, WHEN, "+79991234568", "complete text")
    assert seen == [b"complete text"]
