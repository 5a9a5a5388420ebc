"""Phone numbers: tolerant parsing of what people type, strict E.164 out."""
from __future__ import annotations

import re
from typing import NamedTuple

import phonenumbers

# Longer input is refused before it reaches the parser: no real number with its punctuation comes near this.
MAX_INPUT_LENGTH = 32
# ASCII digits and the punctuation people write numbers with.  The check runs before phonenumbers sees the
# text, because phonenumbers would quietly accept full-width or Arabic-Indic digits and letters ("1-800-FLOWERS").
_ALLOWED = re.compile(r"\+[0-9 ().\-]+")


class InvalidPhone(ValueError):
    """Not a valid international phone number."""


class PhoneNumber(NamedTuple):
    """A valid number: its E.164 form and its ISO 3166 alpha-2 region (None when it belongs to no single one)."""

    e164: str
    region: str | None


def parse_phone(raw: str) -> PhoneNumber:
    """Parse ``raw`` once into its E.164 form and region, or raise :class:`InvalidPhone` with the reason.

    The API needs both for every POST, and parsing is most of what validating a message costs (see
    docs/profile.md), so the two come from one parse.
    """
    if len(raw) > MAX_INPUT_LENGTH:
        raise InvalidPhone(f"Longer than {MAX_INPUT_LENGTH} characters.")
    text = raw.strip(" ")  # spaces only: other whitespace and control characters are not "tolerated" punctuation
    if not _ALLOWED.fullmatch(text):
        raise InvalidPhone("Use the international format: '+', the country code and the number (ASCII digits; "
                           "spaces, dashes, dots and parentheses are allowed).")
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhone("Not a valid phone number.") from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhone("Not a valid phone number.")
    return PhoneNumber(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), _region(number))


def region_of(e164: str) -> str | None:
    """The ISO 3166 alpha-2 region of a normalised number, or None when it belongs to no single region."""
    return _region(phonenumbers.parse(e164, None))


def _region(number: phonenumbers.PhoneNumber) -> str | None:
    """The number's region; "001" (non-geographic: satellite, universal freephone) counts as none."""
    region = phonenumbers.region_code_for_number(number)
    return region if region and region != "001" else None
