"""Time zones: the API and a dispatcher run with ``TZ=Asia/Tokyo`` (UTC+9) while PostgreSQL runs in UTC.

Also, in the full run, with the database's own default time zone set to a half-hour zone (America/St_Johns)
that the service's sessions must override.  What must hold: every timestamp in the API's answers carries an
offset (UTC) and is right (``created_at`` within a second of the client's UTC clock around the POST), and the
``file`` provider's file names hold the UTC send time: within a second of the attempt's start, of ``sent_at``
and of the file's own modification time.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from bench.support import http_json
from chaos.harness import FILE_NAME, HEADERS, Outcome, Stage, describe, parse_time

TOKYO = "Asia/Tokyo"
TIMESTAMP_FIELDS = ("created_at", "updated_at", "sent_at", "delivered_at")
SECOND = dt.timedelta(seconds=1)


def run(admin_dsn: str, workdir: Path, *, database_zones: tuple[str, ...]) -> Outcome:
    """One pass per database time zone."""
    outcome = Outcome("timezone", f"TZ={TOKYO} for the API and the dispatcher")
    outcome.notes += describe(__doc__)
    for zone in database_zones:
        with Stage(admin_dsn, "tz_" + zone.replace("/", "_").lower(), workdir) as stage:
            _pass(stage, zone, outcome)
    return outcome


def _stamps(message: dict[str, Any]) -> list[str]:
    """Every timestamp in a message answer (its own and its attempts')."""
    values = [message.get(f) for f in TIMESTAMP_FIELDS]
    for attempt in message.get("attempts", []):
        values += [attempt.get("started_at"), attempt.get("finished_at")]
    return [v for v in values if v is not None]


def _pass(stage: Stage, zone: str, outcome: Outcome) -> None:
    """POST, wait, read back, look at the files and the logs."""
    label = f"db {zone}"
    stage.rows(f'ALTER DATABASE "{stage.db.name}" SET timezone = %s', (zone,))
    url = stage.api(TZ=TOKYO)[1]
    dispatcher = stage.dispatcher("dispatcher", wait=True, TZ=TOKYO)
    ids = _post(url, label, outcome)
    outcome.check(f"{label}: the messages finish (sent, then delivered 0.5 s later)", stage.wait_finished(30))
    messages = [http_json("GET", f"{url}/api/v1/messages/{i}", headers=HEADERS)[1] for i in ids]
    _read_checks(url, label, messages, outcome)
    _file_checks(stage, label, [m for m in messages if m.get("provider") == "file"], outcome)
    times = [e.get("time", "") for e in dispatcher.log_events()]
    outcome.check(f"{label}: the dispatcher's log times are UTC", bool(times) and all(
        str(t).endswith("+00:00") for t in times), f"e.g. {times[0] if times else '-'}")


def _post(url: str, label: str, outcome: Outcome) -> list[str]:
    """Five file messages to even numbers and one stub message; checks the answers' created_at.  The new ids."""
    posted = []
    for i in range(6):
        phone = f"+799970000{i}4" if i < 5 else "+79997000993"
        before = dt.datetime.now(dt.timezone.utc)
        status, body = http_json("POST", url + "/api/v1/messages", {
            "phone": phone, "text": f"tz {i}", "provider": "file" if i < 5 else "stub"}, HEADERS)
        posted.append((status, body, before, dt.datetime.now(dt.timezone.utc)))
    outcome.check(f"{label}: every POST answered 201", all(p[0] == 201 for p in posted),
                  str([p[0] for p in posted]))
    created_ok = [p for p in posted if p[0] == 201 and before_after(p[1]["created_at"], p[2], p[3])]
    outcome.check(f"{label}: created_at has an offset and lies within 1 s of the client's UTC clock",
                  len(created_ok) == len(posted),
                  f"{len(created_ok)}/{len(posted)}; e.g. {posted[0][1].get('created_at')} for a POST at "
                  f"{posted[0][2].isoformat(timespec='milliseconds')}")
    return [str(p[1]["id"]) for p in posted if p[0] == 201]


def _read_checks(url: str, label: str, messages: list[dict[str, Any]], outcome: Outcome) -> None:
    """Timestamps in GET answers: UTC offsets, the list agreeing with GET by id, the delivery delay."""
    stamps = [s for m in messages for s in _stamps(m)]
    outcome.check(f"{label}: every timestamp in the answers carries a UTC offset (+00:00)",
                  all(parse_time(s).utcoffset() == dt.timedelta(0) for s in stamps),
                  f"{len(stamps)} timestamps, e.g. {stamps[0] if stamps else '-'}")
    listed = http_json("GET", f"{url}/api/v1/messages?limit=20", headers=HEADERS)[1]
    listed_by_id = {m["id"]: m for m in (listed or {}).get("items", [])}
    outcome.check(f"{label}: the list answers the same timestamps",
                  all(_stamps(listed_by_id.get(m["id"], {})) == _stamps(m) for m in messages))
    file_messages = [m for m in messages if m.get("provider") == "file"]
    delays = [parse_time(m["delivered_at"]) - parse_time(m["sent_at"]) for m in file_messages
              if m.get("delivered_at") and m.get("sent_at")]
    outcome.check(f"{label}: delivered_at = sent_at + 0.5 s", len(delays) == len(file_messages) and all(
        d == dt.timedelta(seconds=0.5) for d in delays), str(sorted({str(d) for d in delays})))


def before_after(value: str, before: dt.datetime, after: dt.datetime) -> bool:
    """``value`` has an offset and lies in [before - 1 s, after + 1 s]."""
    stamp = parse_time(value)
    return stamp.tzinfo is not None and before - SECOND <= stamp <= after + SECOND


def _file_checks(stage: Stage, label: str, messages: list[dict[str, Any]], outcome: Outcome) -> None:
    """Each file message's file name: a UTC datetime within 1 s of its send (and of the file's mtime)."""
    files = {}
    for path in stage.sent_dir.glob("*.txt"):
        match = FILE_NAME.fullmatch(path.name)
        if match:
            files[match["phone"]] = (path, dt.datetime.fromisoformat(match["stamp"]))
    problems = []
    example = ""
    for message in messages:
        found = files.get(message["phone"])
        if found is None:
            problems.append(f"no file for {message['phone']}")
            continue
        path, stamp = found
        ok_attempt = next(a for a in message["attempts"] if a["result"] == "ok")
        mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
        references = {"attempt start": parse_time(ok_attempt["started_at"]), "sent_at": parse_time(message["sent_at"]),
                      "file mtime": mtime}
        example = f"{path.name} vs sent_at {message['sent_at']}"
        if stamp.utcoffset() != dt.timedelta(0):
            problems.append(f"{path.name}: not UTC")
            continue
        problems += [f"{path.name}: {name} {ref.isoformat()} is {abs(stamp - ref).total_seconds():.3f} s away"
                     for name, ref in references.items() if abs(stamp - ref) > SECOND]
    outcome.check(f"{label}: file names hold the UTC send time (within 1 s of the attempt, sent_at, mtime)",
                  not problems and bool(messages), "; ".join(problems[:3]) or example)
