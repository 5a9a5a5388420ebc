"""Settings: built-in defaults, then an optional TOML file (``SMSGATE_CONFIG``), then environment variables.

Every value has a default, so a fresh clone runs with none of them set.  Environment variables win over the
file: the contract's short names (``DATABASE_URL``, ``HOST``, ``PORT``, ``SENT_SMS_DIR``, ``LOG_LEVEL``) and, for
any other key, ``SMSGATE_<SECTION>__<KEY>`` (for example ``SMSGATE_PROVIDERS__FILE__MAX_ATTEMPTS=5`` or
``SMSGATE_DISPATCHER__LEASE_SECONDS=10``).  A value given as text where a number, a boolean or a list is expected
is read as a TOML value (``5``, ``0.5``, ``true``, ``["smsauth", "jwt"]``); text settings take the text as it is.

Settings are checked once, at start-up: an unknown key or a value of the wrong type stops the process with a
:class:`SettingsError` that names the key, instead of surfacing later as an odd runtime failure.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, MutableMapping, TypeVar

import phonenumbers

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The providers a fresh clone has; the contract fixes these numbers.
DEFAULT_PROVIDERS: dict[str, dict[str, Any]] = {
    "file": {"max_attempts": 3, "retry_interval": 0.5},
    "stub": {"max_attempts": 1, "retry_interval": 0.5},
}

# Environment variables of the contract, and the settings key each one sets.
SHORT_ENV_NAMES: dict[str, tuple[str, ...]] = {
    "DATABASE_URL": ("database_url",),
    "HOST": ("api", "host"),
    "PORT": ("api", "port"),
    "SENT_SMS_DIR": ("sent_sms_dir",),
    "LOG_LEVEL": ("log_level",),
}
ENV_PREFIX = "SMSGATE_"
CONFIG_ENV = "SMSGATE_CONFIG"

T = TypeVar("T")


class SettingsError(ValueError):
    """The settings are invalid."""


@dataclass(frozen=True)
class ProviderSettings:  # pylint: disable=too-many-instance-attributes
    """How one configured provider is used: which implementation, how often and how patiently."""

    name: str
    type: str
    max_attempts: int = 1
    retry_interval: float = 0.5
    timeout: float = 5.0
    enabled: bool = True
    priority: int = 100             # among providers rated alike, the lower number is chosen first
    rate_limit_per_minute: int | None = None  # attempts per window (a minute in production); None: unlimited
    regions: tuple[str, ...] = ("*",)          # ISO 3166 alpha-2 codes served, or "*" for every region
    options: Mapping[str, Any] = field(default_factory=dict)

    def serves(self, region: str | None) -> bool:
        """True when this provider may send to a number of ``region`` (None: a non-geographic number)."""
        return "*" in self.regions or (region is not None and region in self.regions)


@dataclass(frozen=True)
class ApiSettings:
    """The HTTP API process."""

    host: str = "127.0.0.1"
    port: int = 8080
    request_deadline: float = 0.8
    commit_grace: float = 0.15
    max_concurrency: int = 64
    max_body_bytes: int = 16 * 1024
    pool_size: int = 10
    statement_timeout: float = 0.6


@dataclass(frozen=True)
class DispatcherSettings:
    """A dispatcher process; every replica reads the same values."""

    batch_size: int = 32
    max_in_flight: int = 64
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    statement_timeout: float = 5.0
    shutdown_grace: float = 20.0
    default_provider: str | None = None
    health_port: int | None = None  # serve /health, /ready and /metrics there (one port per replica)


JWT_ALGORITHMS = ("HS256", "RS256", "ES256")
AUTH_SCHEMES = ("smsauth", "jwt")


@dataclass(frozen=True)
class AuthSettings:  # pylint: disable=too-many-instance-attributes
    """Which credentials the API accepts, and how JWTs from the SSO are checked."""

    schemes: tuple[str, ...] = ("smsauth",)
    jwt_algorithm: str = "HS256"
    jwt_secret: str | None = None       # HS256: the shared secret
    jwt_public_key: str | None = None   # RS256/ES256: the SSO's public key, PEM text (a path is read at start-up)
    jwt_username_claim: str = "sub"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 30.0

    @property
    def jwt_key(self) -> str | None:
        """The key tokens are verified with, for the configured algorithm."""
        return self.jwt_secret if self.jwt_algorithm.startswith("HS") else self.jwt_public_key


@dataclass(frozen=True)
class MetricsSettings:
    """Cluster-wide per-window counts (published at /metrics and optionally pushed)."""

    window_seconds: float = 60.0
    pushgateway_url: str | None = None
    pushgateway_job: str = "smsgate"


@dataclass(frozen=True)
class AlertSettings:  # pylint: disable=too-many-instance-attributes
    """Outage alerts to the admins: by email over SMTP, and optionally a webhook."""

    window_minutes: float = 60.0
    admins: tuple[str, ...] = ()
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_tls: bool = False            # implicit TLS (port 465); STARTTLS is used whenever the server offers it
    smtp_username: str | None = None
    smtp_password: str | None = None
    sender: str = "smsgate@localhost"
    webhook_url: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything the API and the dispatchers are configured with."""

    database_url: str | None = None
    sent_sms_dir: Path = PROJECT_ROOT / "sent_sms"
    data_dir: Path = PROJECT_ROOT / ".data"
    log_level: str = "INFO"
    api: ApiSettings = ApiSettings()
    auth: AuthSettings = AuthSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    metrics: MetricsSettings = MetricsSettings()
    alerts: AlertSettings = AlertSettings()
    providers: tuple[ProviderSettings, ...] = ()

    def provider(self, name: str) -> ProviderSettings | None:
        """The settings of the provider called ``name``, or None when there is none."""
        return next((p for p in self.providers if p.name == name), None)

    @property
    def provider_names(self) -> tuple[str, ...]:
        """Names of the enabled providers, in configuration order."""
        return tuple(p.name for p in self.providers if p.enabled)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the TOML file named by ``SMSGATE_CONFIG`` and the environment."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config_path = env.get(CONFIG_ENV)
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                raw = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read {CONFIG_ENV}={config_path}: {exc}") from exc
    for key, value in _env_overrides(env).items():
        _set_path(raw, key, value)
    return settings_from_mapping(raw)


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Check a nested mapping (the TOML document's shape) and turn it into :class:`Settings`."""
    reader = _Reader(dict(raw), "")
    api = reader.section("api")
    auth = reader.section("auth")
    dispatcher = reader.section("dispatcher")
    settings = Settings(
        database_url=reader.get("database_url", str, None) or None,
        sent_sms_dir=Path(reader.get("sent_sms_dir", str, str(Settings.sent_sms_dir))).absolute(),
        data_dir=Path(reader.get("data_dir", str, str(Settings.data_dir))).absolute(),
        log_level=reader.get("log_level", str, "INFO").upper(),
        api=ApiSettings(
            host=api.get("host", str, ApiSettings.host),
            port=api.number("port", int, ApiSettings.port, low=0, high=65535),
            request_deadline=api.number("request_deadline", float, ApiSettings.request_deadline, low=0.05, high=30),
            commit_grace=api.number("commit_grace", float, ApiSettings.commit_grace, low=0, high=30),
            max_concurrency=api.number("max_concurrency", int, ApiSettings.max_concurrency, low=1, high=100_000),
            max_body_bytes=api.number("max_body_bytes", int, ApiSettings.max_body_bytes, low=256, high=1 << 24),
            pool_size=api.number("pool_size", int, ApiSettings.pool_size, low=1, high=1000),
            statement_timeout=api.number("statement_timeout", float, ApiSettings.statement_timeout,
                                         low=0.01, high=60),
        ),
        auth=_auth(auth),
        dispatcher=DispatcherSettings(
            batch_size=dispatcher.number("batch_size", int, DispatcherSettings.batch_size, low=1, high=10_000),
            max_in_flight=dispatcher.number("max_in_flight", int, DispatcherSettings.max_in_flight,
                                            low=1, high=100_000),
            lease_seconds=dispatcher.number("lease_seconds", float, DispatcherSettings.lease_seconds,
                                            low=0.1, high=86_400),
            poll_interval=dispatcher.number("poll_interval", float, DispatcherSettings.poll_interval,
                                            low=0.01, high=3600),
            statement_timeout=dispatcher.number("statement_timeout", float, DispatcherSettings.statement_timeout,
                                                low=0.01, high=3600),
            shutdown_grace=dispatcher.number("shutdown_grace", float, DispatcherSettings.shutdown_grace,
                                             low=0, high=3600),
            default_provider=dispatcher.get("default_provider", str, None),
            health_port=dispatcher.get("health_port", int, None),
        ),
        metrics=_metrics(reader.section("metrics")),
        alerts=_alerts(reader.section("alerts")),
        providers=_providers(reader.section("providers", keep_unknown=True)),
    )
    for section in (reader, api, auth, dispatcher, *reader.children):
        section.reject_unknown()
    _check_consistency(settings)
    return settings


def _metrics(section: _Reader) -> MetricsSettings:
    """The ``[metrics]`` table."""
    return MetricsSettings(
        window_seconds=section.number("window_seconds", float, MetricsSettings.window_seconds, low=0.1, high=3600),
        pushgateway_url=section.get("pushgateway_url", str, None) or None,
        pushgateway_job=section.get("pushgateway_job", str, MetricsSettings.pushgateway_job),
    )


def _alerts(section: _Reader) -> AlertSettings:
    """The ``[alerts]`` table."""
    admins = section.get("admins", list, [])
    if not all(isinstance(a, str) and "@" in a for a in admins):
        raise SettingsError(f"alerts.admins must be a list of email addresses, not {admins!r}")
    return AlertSettings(
        window_minutes=section.number("window_minutes", float, AlertSettings.window_minutes, low=0.001, high=10_080),
        admins=tuple(admins),
        smtp_host=section.get("smtp_host", str, None) or None,
        smtp_port=section.number("smtp_port", int, AlertSettings.smtp_port, low=1, high=65535),
        smtp_tls=section.get("smtp_tls", bool, False),
        smtp_username=section.get("smtp_username", str, None) or None,
        smtp_password=section.get("smtp_password", str, None) or None,
        sender=section.get("sender", str, AlertSettings.sender),
        webhook_url=section.get("webhook_url", str, None) or None,
    )


def _auth(section: _Reader) -> AuthSettings:
    """The ``[auth]`` table; without ``schemes``, JWTs are accepted exactly when a key is configured."""
    algorithm = section.get("jwt_algorithm", str, AuthSettings.jwt_algorithm).upper()
    if algorithm not in JWT_ALGORITHMS:
        raise SettingsError(f"auth.jwt_algorithm must be one of {', '.join(JWT_ALGORITHMS)}, not {algorithm!r}")
    public_key = section.get("jwt_public_key", str, None) or None
    if public_key is not None and not public_key.lstrip().startswith("-----BEGIN"):
        try:
            public_key = Path(public_key).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"auth.jwt_public_key: not PEM text and not a readable file: {exc}") from exc
    auth = AuthSettings(
        jwt_algorithm=algorithm,
        jwt_secret=section.get("jwt_secret", str, None) or None,
        jwt_public_key=public_key,
        jwt_username_claim=section.get("jwt_username_claim", str, AuthSettings.jwt_username_claim),
        jwt_issuer=section.get("jwt_issuer", str, None) or None,
        jwt_audience=section.get("jwt_audience", str, None) or None,
        jwt_leeway_seconds=section.number("jwt_leeway_seconds", float, AuthSettings.jwt_leeway_seconds,
                                          low=0, high=3600),
    )
    if algorithm.startswith("HS") and auth.jwt_public_key or not algorithm.startswith("HS") and auth.jwt_secret:
        raise SettingsError(f"auth: {algorithm} verifies with "
                            f"{'jwt_secret' if algorithm.startswith('HS') else 'jwt_public_key'}, not with "
                            f"{'jwt_public_key' if algorithm.startswith('HS') else 'jwt_secret'}")
    # Secure by default: configuring the SSO's key means SSO tokens only; SMSAUTH stays on only when listed.
    default_schemes = ["jwt"] if auth.jwt_key else ["smsauth"]
    schemes = section.get("schemes", list, default_schemes)
    if not schemes or any(s not in AUTH_SCHEMES for s in schemes):
        raise SettingsError(f"auth.schemes must be a non-empty list of {', '.join(AUTH_SCHEMES)}, not {schemes!r}")
    if "jwt" in schemes and not auth.jwt_key:
        raise SettingsError(f"auth.schemes has jwt but no key for {algorithm} is set "
                            f"(auth.{'jwt_secret' if algorithm.startswith('HS') else 'jwt_public_key'})")
    if algorithm.startswith("HS") and auth.jwt_secret is not None and len(auth.jwt_secret.encode()) < 32:
        # RFC 7518 3.2: an HMAC key must be at least as long as the hash output (32 bytes for SHA-256).
        raise SettingsError("auth.jwt_secret must be at least 32 bytes long")
    return replace(auth, schemes=tuple(dict.fromkeys(schemes)))


def _providers(section: _Reader) -> tuple[ProviderSettings, ...]:
    """Defaults for the built-in providers, overlaid by the ``[providers.<name>]`` tables."""
    tables: dict[str, Any] = {name: dict(values) for name, values in DEFAULT_PROVIDERS.items()}
    for name, table in section.data.items():
        if not isinstance(table, Mapping):
            raise SettingsError(f"providers.{name} must be a table")
        tables.setdefault(name, {}).update(table)
    result = []
    for name, table in tables.items():
        if not name or not all(c.isalnum() or c in "_-" for c in name) or not name.isascii():
            raise SettingsError(f"provider name {name!r} must be ASCII letters, digits, '_' or '-'")
        reader = _Reader(table, f"providers.{name}.")
        timeout = reader.number("timeout", float, ProviderSettings.timeout, low=0.01, high=3600)
        result.append(ProviderSettings(
            name=name,
            type=reader.get("type", str, name),
            max_attempts=reader.number("max_attempts", int, ProviderSettings.max_attempts, low=1, high=100),
            retry_interval=reader.number("retry_interval", float, ProviderSettings.retry_interval,
                                         low=0, high=86_400),
            timeout=timeout,
            enabled=reader.get("enabled", bool, True),
            priority=reader.number("priority", int, ProviderSettings.priority, low=-1_000_000, high=1_000_000),
            rate_limit_per_minute=_optional_positive(reader, "rate_limit_per_minute"),
            regions=_regions(reader),
            # Whatever else the table holds belongs to the provider implementation, which checks it itself.
            options={k: v for k, v in table.items() if k not in reader.seen},
        ))
    return tuple(result)


def _optional_positive(reader: _Reader, key: str) -> int | None:
    """An optional whole number >= 1."""
    if reader.get(key, object, None) is None:
        return None
    return reader.number(key, int, 1, low=1, high=100_000_000)


def _regions(reader: _Reader) -> tuple[str, ...]:
    """ISO 3166 alpha-2 region codes (upper case) or "*"."""
    regions = reader.get("regions", list, ["*"])
    known = phonenumbers.SUPPORTED_REGIONS
    if not regions or not all(isinstance(r, str) and (r == "*" or r.upper() in known) for r in regions):
        raise SettingsError(f"{reader.prefix}regions must be ISO 3166 alpha-2 codes or \"*\", not {regions!r}")
    return tuple(r.upper() for r in regions)


def _check_consistency(settings: Settings) -> None:
    """Rules that span several values."""
    if not settings.provider_names:
        raise SettingsError("at least one provider must be enabled")
    default = settings.dispatcher.default_provider
    if default is not None and default not in settings.provider_names:
        raise SettingsError(f"dispatcher.default_provider {default!r} is not an enabled provider")
    slowest = max(p.timeout for p in settings.providers)
    if settings.dispatcher.lease_seconds <= slowest:
        # A lease shorter than a provider call would let a second dispatcher resend a message in flight.
        raise SettingsError(f"dispatcher.lease_seconds ({settings.dispatcher.lease_seconds}) must exceed the "
                            f"longest provider timeout ({slowest})")


def _env_overrides(env: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    """Settings keys and values given through the environment."""
    found: dict[tuple[str, ...], Any] = {}
    for name, value in env.items():
        if name in SHORT_ENV_NAMES:
            found[SHORT_ENV_NAMES[name]] = value
        elif name.startswith(ENV_PREFIX) and "__" in name:
            parts = name[len(ENV_PREFIX):].split("__")
            key = tuple(p.lower() for p in parts)
            if key and key[0] == "providers" and len(key) == 3:
                key = ("providers", parts[1].lower(), parts[2].lower())
            found[key] = value
        elif name.startswith(ENV_PREFIX) and name != CONFIG_ENV:
            found[(name[len(ENV_PREFIX):].lower(),)] = value
    return found


def _parse_text_value(value: str) -> Any:
    """A TOML value when the text is one (5, 0.5, true, ["RU"]), else the text itself."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _set_path(raw: MutableMapping[str, Any], key: tuple[str, ...], value: Any) -> None:
    """Set ``raw[k1][k2]...[kn] = value``, creating tables on the way."""
    node = raw
    for part in key[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, MutableMapping):
            raise SettingsError(f"{'.'.join(key)}: {part} is not a table")
        node = child
    node[key[-1]] = value


class _Reader:
    """Typed reads from one table, remembering which keys were used so that typos can be reported."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        """Read from ``data``; ``prefix`` names the table in error messages."""
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()
        self.children: list[_Reader] = []

    def get(self, key: str, kind: type[T], default: T) -> T:
        """The value of ``key``, checked to be of ``kind``; ``default`` when absent."""
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, str) and kind is not str:
            value = _parse_text_value(value)  # from the environment, where every value is text
            if kind is list and isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]  # "jwt,smsauth"
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SettingsError(f"{self.prefix}{key} must be {kind.__name__}, not {value!r}")
        return value

    def number(self, key: str, kind: type[T], default: T, *, low: float, high: float) -> T:
        """A number of ``kind`` within [low, high]."""
        value = self.get(key, kind, default)
        if not low <= value <= high:  # type: ignore[operator]
            raise SettingsError(f"{self.prefix}{key} must be between {low} and {high}, not {value!r}")
        return value

    def section(self, key: str, *, keep_unknown: bool = False) -> _Reader:
        """A reader for the sub-table ``key`` (empty when absent)."""
        self.seen.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            raise SettingsError(f"{self.prefix}{key} must be a table")
        reader = _Reader(value, f"{self.prefix}{key}.")
        if keep_unknown:
            reader.seen.update(value)
        self.children.append(reader)
        return reader

    def reject_unknown(self) -> None:
        """Fail on keys nobody read: they are almost always typos."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(self.prefix + k for k in unknown)}")
