"""The signature font loader: sizes on demand, and a bad font file refused at startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.fonts import SignatureFonts


def test_fonts_come_at_the_asked_size_and_are_cached() -> None:
    fonts = SignatureFonts()
    font = fonts(40)
    assert getattr(font, "size") == 40
    assert fonts(40) is font
    assert getattr(fonts(12), "size") == 12


def test_missing_font_file_is_refused_on_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SIGNATURE_FONT_PATH"):
        SignatureFonts(tmp_path / "absent.ttf")


def test_file_that_is_not_a_font_is_refused_on_construction(tmp_path: Path) -> None:
    # Found at startup, not on the first text signature (where it would fail every such job).
    not_a_font = tmp_path / "font.ttf"
    not_a_font.write_bytes(b"this is not a TrueType font" * 10)
    with pytest.raises(OSError, match=r"SIGNATURE_FONT_PATH: .*font\.ttf cannot be read as a font"):
        SignatureFonts(not_a_font)
