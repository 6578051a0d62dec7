"""Boundary cases of the reference decoder's limits (spec §7.1 zstd window, §4.3 settings types),
from the numbers in the spec's text (mutation audit 0.2: R2, R5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import reference_decoder
from zstd_frames import MIB, frame, window_bytes

ROOT = Path(__file__).resolve().parent.parent


ref = reference_decoder()


@pytest.mark.parametrize("descriptor", [0x87, 0x88])
def test_a_window_of_exactly_128_mib_is_accepted(descriptor: int) -> None:
    assert window_bytes(descriptor) <= 128 * MIB
    assert ref.walk_zstd_frame(frame(window=descriptor)) == 300


@pytest.mark.parametrize("descriptor", [0x89, 0x8F])
def test_a_window_over_128_mib_is_rejected(descriptor: int) -> None:
    with pytest.raises(ref.FormatError, match="window"):
        ref.walk_zstd_frame(frame(window=descriptor))


@pytest.mark.parametrize("flag", [1, 2, 3])
def test_every_dictionary_flag_is_rejected(flag: int) -> None:
    with pytest.raises(ref.FormatError, match="dictionary"):
        ref.walk_zstd_frame(frame(dict_flag=flag))


@pytest.mark.parametrize("key", ["k", "chunk_rows", "level"])
@pytest.mark.parametrize("value", ["3", 3.5, None, [3]])
def test_settings_integers_must_be_integers(key: str, value: object) -> None:
    """§4.3: settings are informative but typed; k, chunk_rows and level are integers."""
    header = {"producer": "p", "tensors": {}, "settings": {key: value}}
    with pytest.raises(ref.HeaderError, match=f"settings.{key}"):
        ref.validate_header(header, False)
    ref.validate_header({"producer": "p", "tensors": {}, "settings": {key: 3}}, False)
