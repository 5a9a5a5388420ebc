"""The HTTP contract: routes, fields, statuses, problems, authentication and isolation."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gzip
import json
import uuid
import zlib
from typing import Any, Callable

import aiopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.schemas import encode_cursor
from tests.helpers import auth

Client = TestClient[web.Request, web.Application]
MESSAGES = "/api/v1/messages"


async def count_rows(pool: aiopg.Pool) -> int:
    """How many messages are stored."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM messages")
        row = await cur.fetchone()
        return int(row[0])


async def post(api: Client, body: Any, user: str = "alice") -> tuple[int, dict[str, Any]]:
    """POST a message body; return the status and the parsed JSON."""
    resp = await api.post(MESSAGES, json=body, headers=auth(user))
    return resp.status, await resp.json(content_type=None)


def assert_problem(status: int, body: dict[str, Any], expected: int, code: str | None = None) -> None:
    """An RFC 9457 problem with the expected status (and code)."""
    assert status == expected, body
    assert body["status"] == expected and body["type"] == "about:blank"
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    if code is not None:
        assert body["code"] == code, body


async def test_post_creates_a_queued_message(api: Client) -> None:
    """201, Location, the resource with normalised phone and no attempts yet."""
    resp = await api.post(MESSAGES, json={"phone": "+7 (999) 123-45.68", "text": "Hello", "provider": "file"},
                          headers=auth())
    assert resp.status == 201
    msg = await resp.json()
    assert resp.headers["Location"] == f"/api/v1/messages/{msg['id']}"
    assert str(uuid.UUID(msg["id"])) == msg["id"]
    assert msg["phone"] == "+79991234568"
    assert msg["text"] == "Hello"
    assert (msg["requested_provider"], msg["provider"]) == ("file", None)
    assert (msg["send_status"], msg["delivery_status"]) == ("queued", "pending")
    assert msg["attempts"] == []
    assert msg["sent_at"] is None and msg["delivered_at"] is None
    created = dt.datetime.fromisoformat(msg["created_at"])
    assert created.utcoffset() == dt.timedelta(0)


async def test_posted_message_is_readable_by_the_next_request(api: Client) -> None:
    """The id returned is readable at once, with the same content."""
    status, msg = await post(api, {"phone": "+79991234568", "text": "x"})
    assert status == 201
    resp = await api.get(f"{MESSAGES}/{msg['id']}", headers=auth())
    assert resp.status == 200
    assert await resp.json() == msg


@pytest.mark.parametrize("text", ["x" * 140, "line1\nline2\r\n\ttabbed", " ", "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./"])
async def test_text_accepted(api: Client, text: str) -> None:
    """Any 1-140 printable ASCII characters, tab, newline and carriage return."""
    status, msg = await post(api, {"phone": "+79991234568", "text": text})
    assert status == 201 and msg["text"] == text


@pytest.mark.parametrize(("body", "field"), [
    ({"phone": "+79991234568", "text": "x" * 141}, "text"),
    ({"phone": "+79991234568", "text": ""}, "text"),
    ({"phone": "+79991234568", "text": "Привет"}, "text"),
    ({"phone": "+79991234568", "text": "caf\u00e9"}, "text"),
    ({"phone": "+79991234568", "text": "nul\u0000byte"}, "text"),
    ({"phone": "+79991234568", "text": "bell\u0007"}, "text"),
    ({"phone": "+79991234568", "text": "del\u007f"}, "text"),
    ({"phone": "+79991234568", "text": "esc\u001b[31m"}, "text"),
    ({"phone": "+79991234568", "text": 42}, "text"),
    ({"phone": "+79991234568", "text": None}, "text"),
    ({"phone": "+79991234568", "text": ["a"]}, "text"),
    ({"phone": "+79991234568"}, "text"),
    ({"text": "no phone"}, "phone"),
    ({"phone": "12", "text": "x"}, "phone"),
    ({"phone": "not a phone", "text": "x"}, "phone"),
    ({"phone": "79991234568", "text": "x"}, "phone"),
    ({"phone": "+7999123456", "text": "x"}, "phone"),
    ({"phone": "+\uff17\uff19\uff19\uff19\uff11\uff12\uff13\uff14\uff15\uff16\uff18", "text": "x"}, "phone"),
    ({"phone": "+\u0667\u0669\u0669\u0669\u0661\u0662\u0663\u0664\u0665\u0666\u0668", "text": "x"}, "phone"),
    ({"phone": "+1-800-FLOWERS", "text": "x"}, "phone"),
    ({"phone": "+7" + "9" * 40, "text": "x"}, "phone"),
    ({"phone": 79991234568, "text": "x"}, "phone"),
    ({"phone": {"n": 1}, "text": "x"}, "phone"),
    ({"phone": "+79991234568\u0000", "text": "x"}, "phone"),
    ({"phone": "\u001c+79991234568\u001f", "text": "x"}, "phone"),
    ({"phone": "\u3000+79991234568", "text": "x"}, "phone"),
    ({"phone": "\u00a0+79991234568", "text": "x"}, "phone"),
    ({"phone": "+79991234568", "text": "x", "provider": "pigeon"}, "provider"),
    ({"phone": "+79991234568", "text": "x", "provider": 1}, "provider"),
    ({"phone": "+79991234568", "text": "x", "colour": "red"}, "colour"),
    ({"phone": "+79991234568", "text": "x", "id": str(uuid.uuid4())}, "id"),
])
async def test_invalid_fields_are_422_naming_the_field(api: Client, pool: aiopg.Pool, body: dict[str, Any],
                                                       field: str) -> None:
    """Each bad field: a 422 validation problem whose errors name it, and nothing stored."""
    status, problem = await post(api, body)
    assert_problem(status, problem, 422, "validation_error")
    assert field in problem["errors"], problem
    assert all(isinstance(m, str) for m in problem["errors"][field]), problem
    assert await count_rows(pool) == 0


@pytest.mark.parametrize(("raw", "ctype", "expected"), [
    (b"{not json", "application/json", 400),
    (b"", "application/json", 400),
    (b"   ", "application/json", 400),
    (b"\xff\xfe{}", "application/json", 400),
    (b"[" * 50_00 + b"]" * 50_00, "application/json", 400),
    (b"[]", "application/json", 422),
    (b"42", "application/json", 422),
    (b"null", "application/json", 422),
    (b'"text"', "application/json", 422),
    (b'{"phone": "+79991234568", "text": "x"}', "text/plain", 415),
    (b"phone=%2B79991234568&text=x", "application/x-www-form-urlencoded", 415),
    (b'{"phone": "+79991234568", "text": "x"}', "", 415),
    (b'{"phone": 1e999999, "text": "x"}', "application/json", 422),
    (b'{"phone": "+79991234568", "text": "' + b"9" * 5000 + b'"}', "application/json", 422),
    (b'{"phone": "+79991234568", "text": "a", "text": "b"}', "application/json", 400),
    (b'{"phone": "+79991234568", "text": "x"}', "application/json; charset=latin-1", 415),
    # Content-Types that break the standard library's header parser (an IndexError, a RecursionError) or keep it
    # busy for a second: never parsed, refused.
    (b'{"phone": "+79991234568", "text": "x"}', "application/json; x*", 415),
    (b'{"phone": "+79991234568", "text": "x"}', "application/json; " + "(" * 500, 415),
    (b'{"phone": "+79991234568", "text": "x"}', "application/json; " + '"' * 8000, 415),
    # RFC 9110 syntax, ASCII only: no Unicode spaces, no unclosed quotes, no spaces inside a parameter
    (b'{"phone": "+79991234568", "text": "x"}', "application/json\u3000", 415),
    (b'{"phone": "+79991234568", "text": "x"}', "\u2003application/json", 415),
    (b'{"phone": "+79991234568", "text": "x"}', 'application/json; charset="utf-8', 415),
    (b'{"phone": "+79991234568", "text": "x"}', "application/json; a b c=d", 415),
    (b'{"phone": "+79991234568", "text": "x"}', "application/json; charset = utf-8", 415),
])
async def test_malformed_bodies_are_problems(api: Client, pool: aiopg.Pool, raw: bytes, ctype: str,
                                             expected: int) -> None:
    """Not JSON, the wrong JSON shape or the wrong media type: a 4xx problem, nothing stored."""
    headers = {**auth(), "Content-Type": ctype} if ctype else auth()
    resp = await api.post(MESSAGES, data=raw, headers=headers)
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert_problem(resp.status, await resp.json(content_type=None), expected)
    assert await count_rows(pool) == 0


async def test_undecodable_content_encoding_is_400(api: Client, pool: aiopg.Pool) -> None:
    """A body that claims gzip but is not: a 400 problem, not a crash."""
    resp = await api.post(MESSAGES, data=b"not gzip at all", headers={
        **auth(), "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert_problem(resp.status, await resp.json(content_type=None), 400, "invalid_body")
    assert await count_rows(pool) == 0


@pytest.mark.parametrize("ctype", ["application/json; foo=\"a;b\"", "application/JSON;charset=\"UTF-8\"",
                                   "application/json; charset=\"utf\\-8\"",
                                   "application/json ;\tcharset=utf8;", "application/json;;"])
async def test_valid_json_content_types(api: Client, ctype: str) -> None:
    """Quoted values (with a ";" inside), case, tabs and empty parameters are all RFC 9110 and accepted."""
    resp = await api.post(MESSAGES, data=b'{"phone": "+79991234568", "text": "x"}',
                          headers={**auth(), "Content-Type": ctype})
    assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("encoding", ["x-foo", "br", "zstd", "gzip, gzip"])
async def test_unknown_content_encoding_is_415(api: Client, pool: aiopg.Pool, encoding: str) -> None:
    """A coding the service does not undo is refused, not read as if it were plain."""
    resp = await api.post(MESSAGES, data=b'{"phone": "+79991234568", "text": "x"}', headers={
        **auth(), "Content-Type": "application/json", "Content-Encoding": encoding})
    assert_problem(resp.status, await resp.json(content_type=None), 415, "unsupported_content_encoding")
    assert await count_rows(pool) == 0


@pytest.mark.parametrize(("encoding", "pack"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some clients send it
    ("gzip", lambda data: gzip.compress(data[:10]) + gzip.compress(data[10:])),  # two members, as `cat a.gz b.gz`
])
async def test_compressed_bodies_are_inflated(api: Client, encoding: str, pack: Callable[[bytes], bytes]) -> None:
    """gzip and deflate bodies are read like plain ones."""
    resp = await api.post(MESSAGES, data=pack(b'{"phone": "+79991234568", "text": "zipped"}'), headers={
        **auth(), "Content-Type": "application/json", "Content-Encoding": encoding})
    assert resp.status == 201 and (await resp.json())["text"] == "zipped"


async def test_repeated_content_encoding_lines_are_one_list(api: Client, pool: aiopg.Pool) -> None:
    """Two Content-Encoding lines mean "identity, gzip" (RFC 9110), a list: refused, not read as the first."""
    resp = await api.post(MESSAGES, data=gzip.compress(b'{"phone": "+79991234568", "text": "x"}'), headers=[
        *auth().items(), ("Content-Type", "application/json"), ("Content-Encoding", "identity"),
        ("Content-Encoding", "gzip")])
    assert_problem(resp.status, await resp.json(content_type=None), 415, "unsupported_content_encoding")
    assert await count_rows(pool) == 0


async def test_compressed_bodies_are_bounded(api: Client, pool: aiopg.Pool) -> None:
    """A small body that inflates past the cap is a 413 as soon as the cap is passed (no inflating it all); a
    gzip stream cut short is a 400; so is a transfer coding other than chunked (a 501)."""
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces in about 64 KB: over the cap even packed
    small_bomb = gzip.compress(b'{"text": "' + b" " * (1024 * 1024) + b'"}')  # 1 MiB in 1 KB
    for body, status in ((small_bomb, 413), (gzip.compress(b'{"phone": "+79991234568", "text": "x"}')[:-5], 400),
                         (bomb, 413)):
        resp = await api.post(MESSAGES, data=body, headers={
            **auth(), "Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert_problem(resp.status, await resp.json(content_type=None), status)
    body = b'{"phone": "+79991234568", "text": "x"}'
    reader, writer = await asyncio.open_connection(api.host, api.port)
    writer.write(b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: SMSAUTH:alice\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                 + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 501 ") and b'"code": "unsupported_transfer_encoding"' in answer, answer
    assert await count_rows(pool) == 0


async def test_an_unknown_expectation_is_a_problem(api: Client, pool: aiopg.Pool) -> None:
    """aiohttp answers an ``Expect`` it does not know itself, before any middleware: still a problem (417)."""
    for method, path in (("GET", "/health"), ("POST", MESSAGES), ("GET", "/nope")):
        resp = await api.request(method, path, headers={**auth(), "Expect": "bogus"},
                                 json={"phone": "+79991234568", "text": "x"})
        assert resp.headers["Content-Type"] == "application/problem+json" and resp.headers["X-Request-ID"]
        assert_problem(resp.status, await resp.json(content_type=None), 417, "expectation_failed")
    assert await count_rows(pool) == 0


async def test_two_authorization_headers_are_refused(api: Client) -> None:
    """Which of two credentials would count is ambiguous: neither does."""
    resp = await api.get(MESSAGES, headers=[("Authorization", "SMSAUTH:alice"), ("Authorization", "SMSAUTH:bob")])
    assert_problem(resp.status, await resp.json(content_type=None), 401, "ambiguous_credentials")


async def test_head_answers_like_get(api: Client) -> None:
    """HEAD on the read routes: GET's status and headers, no body."""
    _, msg = await post(api, {"phone": "+79991234568", "text": "x"})
    for path in ("/health", "/ready", f"{MESSAGES}/{msg['id']}", MESSAGES):
        resp = await api.head(path, headers=auth())
        assert resp.status == 200 and await resp.read() == b""
    assert (await api.head(f"{MESSAGES}/{uuid.uuid4()}", headers=auth())).status == 404


async def test_swagger_ui_files(api: Client) -> None:
    """The Swagger UI's files are served; a missing one is a 404 problem like any other."""
    assert (await api.get("/api/static/swagger/swagger-ui.css")).status == 200
    for name in ("nope.js", "", "..%2Fapp.py", "a" * 256, "%E2%82%AC" * 100):  # 100 characters, 300 bytes
        resp = await api.get(f"/api/static/swagger/{name}")
        assert_problem(resp.status, await resp.json(content_type=None), 404)
    whole = await (await api.get("/api/static/swagger/swagger-ui.css")).read()
    for header, value in (("Range", "bytes=abc"), ("Range", "bytes=5-1"), ("If-Match", '"nope"'),
                          ("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")):
        resp = await api.get("/api/static/swagger/swagger-ui.css", headers={header: value})
        assert resp.status == 200 and await resp.read() == whole, (header, value)  # not a bodiless 412 or 416
        assert resp.headers["X-Request-ID"] and resp.headers["ETag"]
    head = await api.head("/api/static/swagger/swagger-ui.css", headers={"Range": "bytes=0-0"})
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(whole) and await head.read() == b""


async def test_huge_body_is_413(api: Client, pool: aiopg.Pool) -> None:
    """A body past the cap (16 KiB) is refused before it is parsed."""
    body = json.dumps({"phone": "+79991234568", "text": "x" * 100_000}).encode()
    resp = await api.post(MESSAGES, data=body, headers={**auth(), "Content-Type": "application/json"})
    assert_problem(resp.status, await resp.json(content_type=None), 413, "payload_too_large")
    assert await count_rows(pool) == 0


async def test_json_with_charset_and_null_provider(api: Client) -> None:
    """``application/json; charset=utf-8`` is JSON; ``"provider": null`` means "the service chooses"."""
    resp = await api.post(MESSAGES, data=b'{"phone": "+79991234568", "text": "x", "provider": null}',
                          headers={**auth(), "Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 201
    assert (await resp.json())["requested_provider"] is None


@pytest.mark.parametrize("header", [
    None, "", "SMSAUTH:", "SMSAUTH: alice", "smsauth:alice", "Basic Zm9vOmJhcg==", "Bearer abc",
    "SMSAUTH:" + "a" * 65, "SMSAUTH:al ice", "SMSAUTH:al/ice", "SMSAUTH:alice:x", "SMSAUTH:al\u00efce",
])
async def test_bad_authorization_is_401(api: Client, pool: aiopg.Pool, header: str | None) -> None:
    """Missing or malformed credentials: 401 problems on every /api route, nothing stored."""
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("POST", MESSAGES), ("GET", MESSAGES), ("GET", f"{MESSAGES}/{uuid.uuid4()}"),
                         ("GET", "/api/v1/providers")):
        resp = await api.request(method, path, json={"phone": "+79991234568", "text": "x"}, headers=headers)
        assert_problem(resp.status, await resp.json(content_type=None), 401)
        assert "WWW-Authenticate" in resp.headers
    assert await count_rows(pool) == 0


@pytest.mark.parametrize("user", ["a", "A" * 64, "john.doe+sms@example.com", "under_score-dash"])
async def test_valid_usernames(api: Client, user: str) -> None:
    """Usernames of 1-64 allowed characters are accepted."""
    status, _ = await post(api, {"phone": "+79991234568", "text": "x"}, user=user)
    assert status == 201


async def test_users_see_only_their_own_messages(api: Client) -> None:
    """Another user's id answers 404 exactly like an unknown one; lists are per user."""
    _, mine = await post(api, {"phone": "+79991234568", "text": "mine"}, user="alice")
    _, theirs = await post(api, {"phone": "+79991234568", "text": "theirs"}, user="bob")
    foreign = await api.get(f"{MESSAGES}/{mine['id']}", headers=auth("bob"))
    unknown = await api.get(f"{MESSAGES}/{uuid.uuid4()}", headers=auth("bob"))
    foreign_body, unknown_body = await foreign.json(content_type=None), await unknown.json(content_type=None)
    assert foreign.status == unknown.status == 404
    assert foreign_body == unknown_body
    bob_list = await (await api.get(MESSAGES, headers=auth("bob"))).json()
    assert [m["id"] for m in bob_list["items"]] == [theirs["id"]]
    filtered = await (await api.get(f"{MESSAGES}?phone=%2B79991234568", headers=auth("carol"))).json()
    assert filtered["items"] == []


@pytest.mark.parametrize("raw_id", ["not-a-uuid", "00000000-0000-4000-8000-00000000000", "%00", "1" * 300,
                                    "{00000000-0000-4000-8000-000000000000}", "urn:uuid:" + str(uuid.uuid4()),
                                    "00000000000040008000000000000000", "..%2F..%2Fetc%2Fpasswd", "%E2%98%83"])
async def test_odd_ids_are_404(api: Client, raw_id: str) -> None:
    """Anything that is not a canonical UUID names no message."""
    resp = await api.get(f"{MESSAGES}/{raw_id}", headers=auth())
    assert_problem(resp.status, await resp.json(content_type=None), 404)


async def test_list_pages_newest_first(api: Client) -> None:
    """Keyset pages of the caller's messages, newest first, with filters."""
    ids = []
    for i in range(5):
        _, msg = await post(api, {"phone": "+79991234568" if i % 2 else "+79991234500", "text": f"m{i}",
                                  "provider": "stub"})
        ids.append(msg["id"])
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await api.get(MESSAGES + query, headers=auth())).json()
        assert len(page["items"]) <= 2
        seen += [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    by_phone = await (await api.get(f"{MESSAGES}?phone=%2B7%20999%20123-45-68", headers=auth())).json()
    assert [m["id"] for m in by_phone["items"]] == [ids[3], ids[1]]
    queued = await (await api.get(f"{MESSAGES}?send_status=queued&delivery_status=pending",
                                  headers=auth())).json()
    assert len(queued["items"]) == 5 and queued["next_cursor"] is None
    none_sent = await (await api.get(f"{MESSAGES}?send_status=sent", headers=auth())).json()
    assert none_sent == {"items": [], "next_cursor": None}


async def test_default_page_is_20(api: Client) -> None:
    """Without ?limit (or with an empty one, as forms send it), pages hold 20; empty filters are no filters."""
    for _ in range(21):
        await post(api, {"phone": "+79991234568", "text": "x"})
    for query in ("", "?limit=&cursor=&phone=&send_status=&delivery_status="):
        page = await (await api.get(MESSAGES + query, headers=auth())).json()
        assert len(page["items"]) == 20 and page["next_cursor"]


@pytest.mark.parametrize("query", [
    "limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1.5", "limit=1&limit=2", "limit=&limit=3",
    "cursor=nonsense", "cursor=" + "A" * 300, "cursor=MjAyNi0xMi0wM3xub3QtYS11dWlk", "send_status=lost",
    "limit=%EF%BC%91%EF%BC%90", "limit=%D9%A1", "limit=1_0", "limit=%201%20", "limit=+5",
    "cursor=" + encode_cursor(dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=23, minutes=59))),
                              uuid.UUID(int=0)),
    "cursor=" + encode_cursor(dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=1.5))),
                              uuid.UUID(int=0)),
    "cursor=" + base64.urlsafe_b64encode(b"2020-01-01T00:00:00+00:00|{" + b"0" * 32 + b"}").decode(),
    "delivery_status=maybe", "phone=12", "colour=red", "send_status=sent&send_status=",
])
async def test_bad_list_queries_are_422(api: Client, query: str) -> None:
    """Every query parameter is validated."""
    resp = await api.get(f"{MESSAGES}?{query}", headers=auth())
    assert_problem(resp.status, await resp.json(content_type=None), 422, "validation_error")


async def test_providers_listed_with_settings_and_capabilities(api: Client) -> None:
    """Both providers with their attempt settings and delivery-report capability."""
    resp = await api.get("/api/v1/providers", headers=auth())
    body = await resp.json()
    by_name = {p["name"]: p for p in body["items"]}
    assert by_name["file"]["max_attempts"] == 3 and by_name["file"]["retry_interval"] == 0.5
    assert by_name["stub"]["max_attempts"] == 1 and by_name["stub"]["retry_interval"] == 0.5
    assert by_name["file"]["supports_delivery_reports"] is True
    assert by_name["stub"]["supports_delivery_reports"] is False


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/api/v1/nope", 404), ("GET", "/nope", 404), ("PATCH", MESSAGES, 405), ("DELETE", MESSAGES, 405),
    ("PUT", f"{MESSAGES}/{uuid.uuid4()}", 405), ("POST", "/health", 405),
])
async def test_aiohttp_errors_are_problems(api: Client, method: str, path: str, status: int) -> None:
    """aiohttp's own 404 and 405 come in the problem format too (405 with Allow)."""
    resp = await api.request(method, path, headers=auth())
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert_problem(resp.status, await resp.json(content_type=None), status)
    if status == 405:
        assert resp.headers["Allow"]


async def test_providers_listing_refuses_unknown_parameters(api: Client) -> None:
    """Like the messages listing: an unknown query parameter is a 422 naming it."""
    resp = await api.get("/api/v1/providers?foo=1", headers=auth())
    body = await resp.json(content_type=None)
    assert_problem(resp.status, body, 422, "validation_error")
    assert "foo" in body["errors"]


async def test_metrics_cannot_be_grown_or_flooded(api: Client) -> None:
    """Made-up methods share one label value; the page is rendered at most once a second, so a flood of scrapes
    costs one render (the requests in between do not show until the next)."""
    for method in ("PROPFIND", "MKCOL", "PURGE"):  # tokens HTTP parsers let through, unknown to every route here
        assert (await api.request(method, "/health")).status == 405
    first = await (await api.get("/metrics")).text()
    assert 'method="other"' in first and "PROPFIND" not in first and "PURGE" not in first
    await api.get("/health")
    pages = await asyncio.gather(*(api.get("/metrics") for _ in range(20)))
    assert {await page.text() for page in pages} == {first}


async def test_service_routes(api: Client) -> None:
    """/health, /ready, /metrics and the OpenAPI document answer without auth."""
    assert await (await api.get("/health")).json() == {"status": "ok"}
    assert (await api.get("/ready")).status == 200
    await api.get(MESSAGES, headers=auth())
    metrics = await (await api.get("/metrics")).text()
    assert 'smsgate_http_requests_total{method="GET",route="/api/v1/messages",status="200"}' in metrics
    doc = await (await api.get("/api/docs/swagger.json")).json()
    assert {"/api/v1/messages", "/api/v1/messages/{id}", "/api/v1/providers"} <= set(doc["paths"])
    assert (await api.get("/api/docs")).status == 200
