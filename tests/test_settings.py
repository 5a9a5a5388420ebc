"""Settings: defaults, the TOML file, environment overrides, and clear errors for bad values."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import SettingsError, load_settings, settings_from_mapping


def test_defaults_match_the_contract() -> None:
    """No file, no environment: port 8080 on 127.0.0.1, file 3 x 0.5 s, stub 1 x 0.5 s."""
    settings = load_settings({})
    assert (settings.api.host, settings.api.port) == ("127.0.0.1", 8080)
    assert settings.database_url is None
    assert [(p.name, p.type, p.max_attempts, p.retry_interval) for p in settings.providers] == [
        ("file", "file", 3, 0.5), ("stub", "stub", 1, 0.5)]
    assert settings.sent_sms_dir.name == "sent_sms"


def test_toml_file_then_environment(tmp_path: Path) -> None:
    """The file sets values; environment variables win over it."""
    config = tmp_path / "smsgate.toml"
    config.write_text("""
database_url = "postgresql://from-file/db"
[api]
port = 9000
[dispatcher]
batch_size = 7
[providers.file]
max_attempts = 5
retry_interval = 2
delivery_delay = 1.5
[providers.backup]
type = "stub"
priority = 5
""")
    settings = load_settings({
        "SMSGATE_CONFIG": str(config), "PORT": "9001", "DATABASE_URL": "postgresql://from-env/db",
        "SENT_SMS_DIR": str(tmp_path / "out"), "SMSGATE_PROVIDERS__FILE__MAX_ATTEMPTS": "4",
        "SMSGATE_DISPATCHER__DEFAULT_PROVIDER": "backup", "SMSGATE_LOG_LEVEL": "debug", "UNRELATED": "x"})
    assert settings.api.port == 9001
    assert settings.database_url == "postgresql://from-env/db"
    assert settings.sent_sms_dir == tmp_path / "out"
    assert settings.dispatcher.batch_size == 7 and settings.dispatcher.default_provider == "backup"
    assert settings.log_level == "DEBUG"
    file = settings.provider("file")
    assert file is not None and (file.max_attempts, file.retry_interval) == (4, 2.0)
    assert file.options == {"delivery_delay": 1.5}
    backup = settings.provider("backup")
    assert backup is not None and (backup.type, backup.priority, backup.max_attempts) == ("stub", 5, 1)
    assert settings.provider("nope") is None


@pytest.mark.parametrize(("raw", "message"), [
    ({"api": {"port": "eighty"}}, "api.port must be int"),
    ({"api": {"port": 70000}}, "api.port must be between"),
    ({"api": {"prot": 1}}, "unknown setting(s): api.prot"),
    ({"colour": "red"}, "unknown setting(s): colour"),
    ({"api": 5}, "api must be a table"),
    ({"providers": {"file": 3}}, "providers.file must be a table"),
    ({"providers": {"file": {"max_attempts": 0}}}, "providers.file.max_attempts must be between"),
    ({"providers": {"file": {"max_attempts": True}}}, "providers.file.max_attempts must be int"),
    ({"providers": {"file": {"enabled": False}, "stub": {"enabled": False}}}, "at least one provider"),
    ({"providers": {"bad name": {}}}, "provider name"),
    ({"dispatcher": {"default_provider": "pigeon"}}, "not an enabled provider"),
    ({"dispatcher": {"lease_seconds": 1.0}}, "must exceed the longest provider timeout"),
])
def test_bad_settings_are_named(raw: dict[str, object], message: str) -> None:
    """Each mistake stops start-up with a message naming the key."""
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from_mapping(raw)


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A missing or broken file is a SettingsError, not a traceback."""
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"SMSGATE_CONFIG": str(tmp_path / "missing.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("[api\n")
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"SMSGATE_CONFIG": str(broken)})


def test_lists_from_the_environment() -> None:
    """A list setting takes TOML (["jwt"]) or plain comma-separated text (jwt,smsauth)."""
    secret = "s" * 32
    as_toml = load_settings({"SMSGATE_AUTH__JWT_SECRET": secret, "SMSGATE_AUTH__SCHEMES": '["jwt"]'})
    as_text = load_settings({"SMSGATE_AUTH__JWT_SECRET": secret, "SMSGATE_AUTH__SCHEMES": "jwt, smsauth"})
    assert as_toml.auth.schemes == ("jwt",) and as_text.auth.schemes == ("jwt", "smsauth")


def test_env_value_into_a_non_table() -> None:
    """An environment key that runs through a plain value is refused."""
    with pytest.raises(SettingsError, match="is not a table"):
        load_settings({"LOG_LEVEL": "INFO", "SMSGATE_LOG_LEVEL__X": "1"})
