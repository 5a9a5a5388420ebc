"""Phone normalisation."""
from __future__ import annotations

import pytest

from common.phones import InvalidPhone, PhoneNumber, parse_phone, region_of


@pytest.mark.parametrize(("raw", "e164"), [
    ("+79991234568", "+79991234568"), ("+7 999 123-45-68", "+79991234568"), ("+7 (999) 123.45.68", "+79991234568"),
    (" +44 20 7946 0958 ", "+442079460958"), ("+1 (202) 555-0143", "+12025550143"),
])
def test_valid_numbers_become_e164(raw: str, e164: str) -> None:
    """Punctuation people type is tolerated; the result is + and digits."""
    assert parse_phone(raw).e164 == e164


@pytest.mark.parametrize("raw", [
    "", "+", "12", "79991234568", "+7999123456", "+7 999 123 45 68 9999", "+1-800-FLOWERS", "+7999123456８",
    "+٧٩٩٩١٢٣٤٥٦٨", "+7999\u00a01234568", "+7" + "9" * 40, "+0 123 456", "++79991234568", "+7/999/1234568",
])
def test_invalid_numbers_are_refused(raw: str) -> None:
    """Anything that is not a valid international number in ASCII digits."""
    with pytest.raises(InvalidPhone):
        parse_phone(raw)


def test_region() -> None:
    """The region comes from the number."""
    assert region_of("+79991234568") == "RU"
    assert region_of("+442079460958") == "GB"
    assert region_of("+80012345678") is None


def test_one_parse_gives_both() -> None:
    """The API's single parse yields the same E.164 form and region as the separate calls."""
    assert parse_phone(" +7 (999) 123-45-68") == PhoneNumber("+79991234568", "RU")
    assert parse_phone("+1 (202) 555-0143") == PhoneNumber("+12025550143", "US")
    assert parse_phone("+800 1234 5678") == PhoneNumber("+80012345678", None)
