"""The PNG's own metadata: A1111's ``parameters`` infotext and the XMP packet, read back."""

from __future__ import annotations

import dataclasses
import io
import re

from PIL import Image

from adapters.provenance.png_metadata import (
    PARAMETERS_KEY,
    XMP_KEY,
    PngText,
    encode_png,
    parameters_text,
    read_png_text,
    xmp_packet,
)
from adapters.provenance.vocabulary import TRAINED_ALGORITHMIC_MEDIA
from tests.unit.provenance_samples import chunks, facts

FACTS = facts(
    artist="Zoë <Artist> & Co",
    prompt="watercolor,  portrait\nvintage",
    negative_prompt="blurry, low quality",
    height=768,
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    lora_checksum="ab" * 32,
    lora_scale=0.8,
)
SOFTWARE = "stylelicense-worker 1.2.3"

# stable-diffusion-webui's modules/infotext_utils.py: the regex its parser splits the last line by.
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters``, reduced to what decides the fields read."""
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = "", "", False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in A1111_PAIR.findall(last):
        fields[key] = value[1:-1] if value.startswith('"') else value
    return fields


def test_the_parameters_read_back_as_a1111_reads_them() -> None:
    fields = a1111_parse(parameters_text(FACTS, software=SOFTWARE, include_prompt=True))
    assert fields == {
        "Prompt": "watercolor, portrait vintage",
        "Negative prompt": "blurry, low quality",
        "Steps": "30",
        "Sampler": "DPM++ 2M",
        "CFG scale": "7.5",
        "Seed": "42",
        "Size": "512x768",
        "Model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "Lora hashes": "style-123: " + "ab" * 6,
        "Lora weight": "0.8",
        "Style id": "123",
        "Generation id": "456",
        "Version": SOFTWARE,
    }


def test_without_the_prompt_setting_no_prompt_text_is_written() -> None:
    text = parameters_text(FACTS, software=SOFTWARE, include_prompt=False)
    assert "\n" not in text and "watercolor" not in text and "blurry" not in text
    fields = a1111_parse(text)
    assert fields["Prompt"] == "" and fields["Seed"] == "42" and fields["Generation id"] == "456"


def test_a_value_with_a_separator_is_quoted_as_a1111_quotes_it() -> None:
    facts = dataclasses.replace(FACTS, model="models/sd15, fine-tuned: v2")
    text = parameters_text(facts, software=SOFTWARE, include_prompt=False)
    assert 'Model: "models/sd15, fine-tuned: v2"' in text
    assert a1111_parse(text)["Model"] == "models/sd15, fine-tuned: v2"


def test_the_base_model_alone_names_no_lora_and_no_style() -> None:
    facts = dataclasses.replace(FACTS, lora_checksum=None, lora_scale=None, style_id=None)
    fields = a1111_parse(parameters_text(facts, software=SOFTWARE, include_prompt=False))
    assert "Lora hashes" not in fields and "Style id" not in fields and "Lora weight" not in fields


def test_pillow_reads_both_chunks_and_the_xmp_says_trained_algorithmic_media() -> None:
    image = Image.linear_gradient("L").convert("RGB")
    parameters = parameters_text(FACTS, software=SOFTWARE, include_prompt=True)
    png = encode_png(
        image, {PARAMETERS_KEY: parameters, XMP_KEY: xmp_packet(FACTS, software=SOFTWARE)}
    )
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.text[PARAMETERS_KEY] == parameters  # type: ignore[attr-defined]
        assert read_png_text(decoded) == PngText(
            parameters=parameters,
            digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
            generation_id=456,
            style_id=123,
            creator_tool=SOFTWARE,
        )
    kinds = _chunk_kinds(png)
    assert kinds.index(b"tEXt") < kinds.index(b"IDAT") and b"iTXt" in kinds


def test_the_artist_is_the_xmp_creator_escaped() -> None:
    packet = xmp_packet(FACTS, software=SOFTWARE)
    assert "<rdf:li>Zoë &lt;Artist&gt; &amp; Co</rdf:li>" in packet
    assert "dc:creator" not in xmp_packet(dataclasses.replace(FACTS, artist=None), software="x")


def test_characters_xml_cannot_hold_are_left_out_and_the_packet_stays_readable() -> None:
    facts = dataclasses.replace(FACTS, artist="Ada\x01 Lovelace\x00", model="m\x0bodel")
    packet = xmp_packet(facts, software="sw\x1f")
    png = encode_png(Image.new("RGB", (8, 8)), {XMP_KEY: packet})
    with Image.open(io.BytesIO(png)) as decoded:
        text = read_png_text(decoded)
    assert text.digital_source_type == TRAINED_ALGORITHMIC_MEDIA and text.creator_tool == "sw"
    assert "<rdf:li>Ada Lovelace</rdf:li>" in packet


def test_a_prompt_outside_latin_1_goes_into_an_itxt_chunk() -> None:
    facts = dataclasses.replace(FACTS, prompt="水彩画")
    parameters = parameters_text(facts, software=SOFTWARE, include_prompt=True)
    png = encode_png(Image.new("RGB", (8, 8)), {PARAMETERS_KEY: parameters})
    assert _chunk_kinds(png).count(b"iTXt") == 1 and b"tEXt" not in _chunk_kinds(png)
    with Image.open(io.BytesIO(png)) as decoded:
        assert read_png_text(decoded).parameters == parameters


def test_foreign_or_broken_metadata_reads_as_none() -> None:
    broken = encode_png(
        Image.new("RGB", (8, 8)),
        {XMP_KEY: "<x:xmpmeta><rdf:RDF", PARAMETERS_KEY: "Steps: 1"},
    )
    with Image.open(io.BytesIO(broken)) as decoded:
        assert read_png_text(decoded) == PngText("Steps: 1", None, None, None, None)
    foreign = xmp_packet(FACTS, software=SOFTWARE).replace('"456"', '"12abc"')
    with Image.open(io.BytesIO(encode_png(Image.new("RGB", (8, 8)), {XMP_KEY: foreign}))) as img:
        text = read_png_text(img)
    assert text.generation_id is None and text.style_id == 123 and text.parameters is None


def test_the_png_is_lossless_at_the_default_zlib_level() -> None:
    image = Image.linear_gradient("L").convert("RGB")
    png = encode_png(image)
    first_idat = next(data for kind, data in chunks(png) if kind == b"IDAT")
    # zlib header 78 9C: FLEVEL 2, "default" compression (level 6); 78 DA would be levels 7-9.
    assert first_idat[:2] == b"\x78\x9c"
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG" and decoded.tobytes() == image.tobytes()


def _chunk_kinds(png: bytes) -> list[bytes]:
    return [kind for kind, _ in chunks(png)]
