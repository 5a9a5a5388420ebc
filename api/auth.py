"""Who is calling: ``SMSAUTH:<username>`` or a JWT from the SSO (``Bearer <token>``), per ``[auth]`` settings.

No user records are kept: the username is the credential (SMSAUTH) or a claim of a token the SSO signed.  For
JWTs only the configured algorithm is accepted, which shuts out ``alg: none`` and the key-confusion attack (an
HS256 token "signed" with an RS256 public key); ``exp`` is required, ``nbf``/``iat`` are checked with a small
leeway, ``iss``/``aud`` when configured.  Each rejection has its own ``code``.
"""
from __future__ import annotations

from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from api.problems import Problem
from common.domain import USERNAME_PATTERN
from common.settings import AuthSettings, SettingsError

SMSAUTH_PREFIX = "SMSAUTH:"
BEARER_PREFIX = "bearer "  # compared case-insensitively: HTTP auth scheme names are (RFC 9110 11.1)
MAX_TOKEN_LENGTH = 4096  # real SSO tokens are far shorter; aiohttp itself caps a header line at 8190 bytes
HINTS = {"smsauth": "'Authorization: SMSAUTH:<username>'", "jwt": "'Authorization: Bearer <token>'"}
CHALLENGES = {"smsauth": 'SMSAUTH realm="smsgate"', "jwt": 'Bearer realm="smsgate"'}

# PyJWT's exceptions, most specific first, and the code each one answers with.
_JWT_ERRORS: tuple[tuple[type[jwt.InvalidTokenError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "The token has expired."),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "The token is not valid yet (nbf or iat)."),
    (jwt.InvalidSignatureError, "invalid_signature", "The token's signature does not verify."),
    (jwt.MissingRequiredClaimError, "missing_claim", "The token lacks a required claim."),
    (jwt.InvalidIssuerError, "invalid_issuer", "The token was issued by someone else."),
    (jwt.InvalidAudienceError, "invalid_audience", "The token is meant for another audience."),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed", "The token's algorithm is not accepted."),
    (jwt.InvalidTokenError, "invalid_token", "The token is malformed."),
)


def public_key(algorithm: str, pem: str) -> Any:
    """The SSO's public key (a PEM public key or certificate), checked to suit ``algorithm``; SettingsError if not.

    A key of the wrong kind would otherwise only fail when the first token arrives, with a server error.
    """
    try:
        if "BEGIN CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem.encode()).public_key()
        else:
            key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise SettingsError("auth.jwt_public_key is not a PEM public key or certificate (a private key, or "
                            "damaged?)") from exc
    if algorithm == "RS256" and not (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
        raise SettingsError("auth.jwt_public_key must be an RSA key of at least 2048 bits for RS256")
    if algorithm == "ES256" and not (isinstance(key, ec.EllipticCurvePublicKey)
                                     and isinstance(key.curve, ec.SECP256R1)):
        raise SettingsError("auth.jwt_public_key must be a P-256 (secp256r1) EC key for ES256")
    return key


class Authenticator:
    """Checks an ``Authorization`` header against the ``[auth]`` settings; built once per application."""

    def __init__(self, settings: AuthSettings) -> None:
        """Load the verification key once (parsing PEM per request would be wasted work)."""
        self.settings = settings
        # Advertise only what is accepted: the challenge and the hint in a 401 name the enabled schemes.
        self.challenge = {"WWW-Authenticate": ", ".join(CHALLENGES[s] for s in settings.schemes)}
        self.hint = " or ".join(HINTS[s] for s in settings.schemes)
        self.key: Any = settings.jwt_key
        if self.key is not None and not settings.jwt_algorithm.startswith("HS"):
            self.key = public_key(settings.jwt_algorithm, self.key)

    def username(self, headers: list[str]) -> str:
        """The caller's username from the Authorization header(s), or a 401 problem saying what is wrong."""
        if len(headers) > 1:
            raise self._unauthorized("ambiguous_credentials", "Send one Authorization header, not several.")
        header = headers[0] if headers else ""
        if not header:
            raise self._unauthorized("authentication_required", f"Send {self.hint}.")
        if header.startswith(SMSAUTH_PREFIX):
            self._require_scheme("smsauth")
            return self._checked_username(header[len(SMSAUTH_PREFIX):])
        if header[:len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            self._require_scheme("jwt")
            return self._jwt_username(header[len(BEARER_PREFIX):].strip())
        raise self._unauthorized("unsupported_auth_scheme", f"Unsupported authorization scheme; send {self.hint}.")

    def _require_scheme(self, scheme: str) -> None:
        """401 when ``scheme`` is switched off in the settings."""
        if scheme not in self.settings.schemes:
            raise self._unauthorized("auth_scheme_disabled",
                                     f"The {scheme} scheme is turned off on this service; send {self.hint}.")

    def _jwt_username(self, token: str) -> str:
        """Verify ``token`` and return its username claim."""
        cfg = self.settings
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise self._unauthorized("invalid_token", "The token is missing or too long.")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.InvalidTokenError as exc:
            raise self._unauthorized("invalid_token", "The token is malformed.") from exc
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise self._unauthorized("unsigned_token", "Unsigned tokens (alg: none) are never accepted.")
        if algorithm != cfg.jwt_algorithm:
            # Before any key is used: "none", or HS256 against an RSA public key, never reaches verification.
            raise self._unauthorized("algorithm_not_allowed", f"Only {cfg.jwt_algorithm} tokens are accepted.")
        try:
            claims = jwt.decode(token, self.key, algorithms=[cfg.jwt_algorithm], audience=cfg.jwt_audience,
                                issuer=cfg.jwt_issuer, leeway=cfg.jwt_leeway_seconds,
                                options={"require": ["exp"], "verify_aud": cfg.jwt_audience is not None})
        except jwt.MissingRequiredClaimError as exc:
            raise self._unauthorized("missing_claim", f"The token lacks the required '{exc.claim}' claim.") from exc
        except jwt.InvalidTokenError as exc:
            code, detail = next((c, d) for kind, c, d in _JWT_ERRORS if isinstance(exc, kind))
            raise self._unauthorized(code, detail) from exc
        value = claims.get(cfg.jwt_username_claim)
        if not isinstance(value, str):
            raise self._unauthorized("missing_claim", f"The token has no '{cfg.jwt_username_claim}' string claim.")
        return self._checked_username(value)

    def _checked_username(self, username: str) -> str:
        """``username`` when it is 1-64 allowed characters, else a 401 problem."""
        if not USERNAME_PATTERN.fullmatch(username):
            raise self._unauthorized("invalid_username",
                                     "The username must be 1-64 characters of A-Z a-z 0-9 . _ @ + -.")
        return username

    def _unauthorized(self, code: str, detail: str) -> Problem:
        """A 401 problem with the challenge header."""
        return Problem(401, detail, code=code, headers=self.challenge)
