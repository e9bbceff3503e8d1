"""`--bits` parsing: the accepted forms, and one clear error for everything else."""

import pytest

from edgeseg.errors import UserError
from edgeseg.quantize.bits import FP32, BitWidths, first_last_widths, parse_bits


@pytest.mark.parametrize(("text", "expected"), [
    ("4/6", BitWidths(4, 6)),
    ("8/8", BitWidths(8, 8)),
    ("2/4", BitWidths(2, 4)),
    (" 4 / 8 ", BitWidths(4, 8)),
    ("fp32", FP32),
    ("FP32", FP32),
    ("float", FP32),
])
def test_valid_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text", ["4", "4/6/8", "1/8", "9/8", "4/9", "4/0", "a/b", "", "4-6", "4/6bits", "int8", "-4/6"])
def test_invalid_bits_is_one_clear_user_error(text):
    with pytest.raises(UserError) as info:
        parse_bits(text)
    message = str(info.value)
    assert "--bits" in message and f"'{text}'" in message and "2..8" in message
    assert "\n" not in message


def test_str_round_trips():
    for text in ("4/6", "8/8", "2/4", "fp32"):
        assert str(parse_bits(text)) == text


def test_first_last_widths():
    base = BitWidths(4, 6)
    assert first_last_widths(None, base) == base
    assert first_last_widths(8, base) == BitWidths(8, 8)
    assert first_last_widths(32, base) == FP32
    for bad in (1, 9, 16, True, "8"):
        with pytest.raises(UserError, match="first_last_bits"):
            first_last_widths(bad, base)
