"""JWT authentication from an SSO, scheme switches, isolation, Idempotency-Key and request ids."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiopg
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api.app import create_app
from api.auth import public_key
from common.settings import SettingsError
from tests.conftest import ClientFactory
from tests.helpers import auth, make_settings

Client = TestClient[web.Request, web.Application]
MESSAGES = "/api/v1/messages"
SECRET = "a-shared-secret-of-at-least-32-bytes!"
BODY = {"phone": "+79991234568", "text": "hi"}


def pem_pair(kind: str) -> tuple[Any, str]:
    """A private key and its public key's PEM text."""
    private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for user 'sso-user', changed by ``overrides`` (None removes a claim)."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "sso-user", "exp": now + 300, "iat": now, "nbf": now,
                            "iss": "https://sso.example", "aud": "smsgate"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


async def jwt_client(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path, **auth_settings: Any) -> Client:
    """An API whose [auth] table is ``auth_settings`` (issuer and audience checked)."""
    table = {"jwt_issuer": "https://sso.example", "jwt_audience": "smsgate", **auth_settings}
    return await aiohttp_client(create_app(make_settings(tmp_path, auth=table), dsn))


async def status_and_code(api: Client, headers: dict[str, str]) -> tuple[int, str | None]:
    """GET the message list with these headers."""
    resp = await api.get(MESSAGES, headers=headers)
    body = await resp.json(content_type=None)
    return resp.status, body.get("code") if resp.status != 200 else None


async def test_hs256_token_authenticates_its_subject(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """A valid HS256 token: the sub claim is the user; SMSAUTH works alongside only when listed."""
    api = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET, schemes=["smsauth", "jwt"])
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    resp = await api.post(MESSAGES, json=BODY, headers=bearer(token))
    assert resp.status == 201
    mine = await (await api.get(MESSAGES, headers=auth("sso-user"))).json()
    assert [m["id"] for m in mine["items"]] == [(await resp.json())["id"]]


@pytest.mark.parametrize(("token_claims", "code"), [
    (claims(exp=int(time.time()) - 3600), "token_expired"),
    (claims(nbf=int(time.time()) + 3600), "token_not_yet_valid"),
    (claims(iat=int(time.time()) + 3600), "token_not_yet_valid"),
    (claims(exp=None), "missing_claim"),
    (claims(iss="https://evil.example"), "invalid_issuer"),
    (claims(aud="another-service"), "invalid_audience"),
    (claims(sub=None), "missing_claim"),
    (claims(sub=12345), "invalid_token"),
    (claims(sub="not a valid username!"), "invalid_username"),
])
async def test_hs256_claim_checks(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path,
                                  token_claims: dict[str, Any], code: str) -> None:
    """Each claim problem is a 401 with its own code."""
    api = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET)
    token = jwt.encode(token_claims, SECRET, algorithm="HS256")
    assert await status_and_code(api, bearer(token)) == (401, code)


async def test_leeway_tolerates_small_clock_skew(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """A token that expired 5 s ago passes with the default 30 s leeway, and fails with none."""
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    lenient = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET)
    strict = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET, jwt_leeway_seconds=0)
    assert (await status_and_code(lenient, bearer(token)))[0] == 200
    assert await status_and_code(strict, bearer(token)) == (401, "token_expired")


def b64(data: bytes) -> str:
    """base64url without padding, as JWTs use it."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unsigned(token_claims: dict[str, Any]) -> str:
    """An ``alg: none`` token."""
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(token_claims).encode())}."


def hmac_signed_with(public_pem: str, token_claims: dict[str, Any]) -> str:
    """The key-confusion attack: an HS256 token whose HMAC key is the RSA/EC public key the service trusts."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64(json.dumps(token_claims).encode())}"
    signature = hmac.new(public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_asymmetric_tokens_and_the_attacks_on_them(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path,
                                                         kind: str) -> None:
    """RS256/ES256 with the SSO's public key; alg none, key confusion, a forged signature each refused."""
    algorithm = "RS256" if kind == "rsa" else "ES256"
    private, public = pem_pair(kind)
    key_file = tmp_path / "sso.pem"
    key_file.write_text(public)
    api = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_algorithm=algorithm, jwt_public_key=str(key_file))
    good = jwt.encode(claims(), private, algorithm=algorithm)
    assert (await status_and_code(api, bearer(good)))[0] == 200
    other_private, _ = pem_pair(kind)
    forged = jwt.encode(claims(), other_private, algorithm=algorithm)
    assert await status_and_code(api, bearer(forged)) == (401, "invalid_signature")
    assert await status_and_code(api, bearer(unsigned(claims()))) == (401, "unsigned_token")
    confused = hmac_signed_with(public, claims())
    assert await status_and_code(api, bearer(confused)) == (401, "algorithm_not_allowed")


def test_a_key_is_jwt_only_by_default(tmp_path: Path) -> None:
    """Configuring the SSO's key turns SMSAUTH off unless the schemes list it."""
    assert make_settings(tmp_path, auth={"jwt_secret": SECRET}).auth.schemes == ("jwt",)
    both = make_settings(tmp_path, auth={"jwt_secret": SECRET, "schemes": ["smsauth", "jwt"]})
    assert both.auth.schemes == ("smsauth", "jwt")


@pytest.mark.parametrize(("algorithm", "kind"), [("RS256", "ec"), ("ES256", "rsa"), ("RS256", "private"),
                                                 ("RS256", "weak"), ("ES256", "p384")])
def test_keys_that_do_not_fit_the_algorithm_stop_start_up(algorithm: str, kind: str) -> None:
    """A key of the wrong kind (or a private key, or a weak one) is refused when the API starts, not at the
    first token."""
    key: Any
    if kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "p384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024 if kind == "weak" else 2048)
    if kind == "private":
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    else:
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(SettingsError, match="jwt_public_key"):
        public_key(algorithm, pem)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "x" * 5000, "eyJhbGciOiJIUzI1NiJ9.e30.\u00e9"])
async def test_malformed_tokens(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path, token: str) -> None:
    """Garbage instead of a token: 401 invalid_token."""
    api = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET)
    status, code = await status_and_code(api, {"Authorization": f"Bearer {token}".encode().decode("latin-1")})
    assert status == 401 and code in ("invalid_token", "authentication_required", "unsupported_auth_scheme")


async def test_schemes_can_be_switched_off(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """With only jwt enabled (production), SMSAUTH is refused; with only smsauth, Bearer is refused."""
    jwt_only = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET, schemes=["jwt"])
    assert await status_and_code(jwt_only, auth()) == (401, "auth_scheme_disabled")
    smsauth_only = await aiohttp_client(create_app(make_settings(tmp_path), dsn))
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert await status_and_code(smsauth_only, bearer(token)) == (401, "auth_scheme_disabled")


@pytest.mark.parametrize(("table", "message"), [
    ({"schemes": ["jwt"]}, "no key"),
    ({"jwt_secret": "short"}, "at least 32 bytes"),
    ({"jwt_algorithm": "HS512"}, "must be one of"),
    ({"schemes": ["kerberos"]}, "non-empty list"),
    ({"jwt_algorithm": "RS256", "jwt_public_key": "/nonexistent.pem"}, "not PEM text"),
    ({"jwt_algorithm": "RS256", "jwt_secret": SECRET}, "not with jwt_secret"),
    ({"jwt_public_key": "-----BEGIN PUBLIC KEY-----"}, "not with jwt_public_key"),
])
def test_auth_settings_are_checked(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    """Misconfigured JWT settings stop start-up."""
    with pytest.raises(SettingsError, match=message):
        make_settings(tmp_path, auth=table)


async def test_idempotent_replay(api: Client, pool: aiopg.Pool) -> None:
    """Same user, key and body: the original message, 200, Idempotent-Replayed; one row."""
    headers = {**auth(), "Idempotency-Key": "order-42/sms-1"}
    first = await api.post(MESSAGES, json=BODY, headers=headers)
    again = await api.post(MESSAGES, json={"phone": "+7 999 123-45-68", "text": "hi"}, headers=headers)
    assert (first.status, again.status) == (201, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert (await first.json())["id"] == (await again.json())["id"]
    assert again.headers["Location"] == first.headers["Location"]
    other_user = await api.post(MESSAGES, json=BODY, headers={**auth("bob"), "Idempotency-Key": "order-42/sms-1"})
    assert other_user.status == 201
    assert await count(pool, "messages") == 2


async def test_key_reused_with_another_body(api: Client, pool: aiopg.Pool) -> None:
    """Same key, different body: 422 idempotency_key_reused, nothing new stored."""
    headers = {**auth(), "Idempotency-Key": "k1"}
    assert (await api.post(MESSAGES, json=BODY, headers=headers)).status == 201
    resp = await api.post(MESSAGES, json={**BODY, "text": "other"}, headers=headers)
    assert resp.status == 422 and (await resp.json())["code"] == "idempotency_key_reused"
    assert await count(pool, "messages") == 1


async def test_concurrent_requests_with_one_key_make_one_message(api: Client, pool: aiopg.Pool) -> None:
    """Twenty at once with the same key: one 201, the rest replays of it, one row."""
    headers = {**auth(), "Idempotency-Key": "race"}
    responses = await asyncio.gather(*[api.post(MESSAGES, json=BODY, headers=headers) for _ in range(20)])
    assert sorted(r.status for r in responses) == [200] * 19 + [201]
    assert len({(await r.json())["id"] for r in responses}) == 1
    assert await count(pool, "messages") == 1 and await count(pool, "idempotency_keys") == 1


async def test_expired_key_makes_a_new_message(api: Client, pool: aiopg.Pool) -> None:
    """After 24 h the key is free again."""
    headers = {**auth(), "Idempotency-Key": "old"}
    first = await (await api.post(MESSAGES, json=BODY, headers=headers)).json()
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    resp = await api.post(MESSAGES, json={**BODY, "text": "new day"}, headers=headers)
    assert resp.status == 201 and (await resp.json())["id"] != first["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9".encode().decode("latin-1"), "tab\there"])
async def test_bad_idempotency_keys(api: Client, pool: aiopg.Pool, key: str) -> None:
    """Keys that are not 1-255 printable ASCII characters: 400, nothing stored."""
    resp = await api.post(MESSAGES, json=BODY, headers={**auth(), "Idempotency-Key": key})
    assert resp.status == 400 and (await resp.json())["code"] == "invalid_idempotency_key"
    assert await count(pool, "messages") == 0


async def count(pool: aiopg.Pool, table: str) -> int:
    """Rows in a table."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SELECT count(*) FROM {table}")
        return int((await cur.fetchone())[0])


async def test_request_ids(api: Client) -> None:
    """A sane client X-Request-ID is echoed; a missing or odd one is replaced by a fresh one (on problems too)."""
    echoed = await api.get("/health", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    fresh = await api.get("/nope", headers={"X-Request-ID": "bad id\u00e9".encode().decode("latin-1")})
    assert fresh.status == 404 and len(fresh.headers["X-Request-ID"]) == 32


async def test_isolation_in_lists_and_filters(api: Client) -> None:
    """User B cannot see, list, filter or page into user A's messages."""
    for _ in range(3):
        await api.post(MESSAGES, json=BODY, headers=auth("alice"))
    page = await (await api.get(f"{MESSAGES}?limit=1", headers=auth("alice"))).json()
    for query in ("", "?phone=%2B79991234568", "?send_status=queued", f"?cursor={page['next_cursor']}"):
        listed = await (await api.get(MESSAGES + query, headers=auth("mallory"))).json()
        assert listed == {"items": [], "next_cursor": None}


async def test_only_enabled_schemes_are_advertised(aiohttp_client: ClientFactory, dsn: str, tmp_path: Path) -> None:
    """With JWT only: the challenge, the 401 hint and the OpenAPI document name Bearer alone; the scheme word
    is case-insensitive; a missing exp is named."""
    api = await jwt_client(aiohttp_client, dsn, tmp_path, jwt_secret=SECRET, schemes=["jwt"])
    resp = await api.get(MESSAGES)
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="smsgate"'
    assert "SMSAUTH" not in (await resp.json())["detail"]
    doc = await (await api.get("/api/docs/swagger.json")).json()
    assert list(doc["securityDefinitions"]) == ["Bearer"]
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert (await status_and_code(api, {"Authorization": f"bearer {token}"}))[0] == 200
    no_exp = await api.get(MESSAGES, headers=bearer(jwt.encode(claims(exp=None), SECRET, algorithm="HS256")))
    assert "'exp'" in (await no_exp.json())["detail"]
