"""``python -m common dsn|migrate``: print the database URL (starting the embedded server if needed), or apply
``schema.sql`` to it."""
from __future__ import annotations

import sys

from common.database import apply_schema, resolve_dsn
from common.settings import SettingsError, load_settings

USAGE = "usage: python -m common dsn|migrate"


def main(argv: list[str]) -> int:
    """Run one command; returns the exit status."""
    if len(argv) != 1 or argv[0] not in ("dsn", "migrate"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        dsn = resolve_dsn(load_settings())
    except SettingsError as exc:
        print(f"smsgate: {exc}", file=sys.stderr)
        return 2
    if argv[0] == "dsn":
        print(dsn)
    else:
        apply_schema(dsn)
        print("schema applied", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
