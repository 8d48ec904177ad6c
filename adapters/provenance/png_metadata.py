"""The PNG's own metadata: an A1111 ``parameters`` text chunk and an XMP packet.

``parameters`` is the infotext AUTOMATIC1111 writes and the tools around it read (civitai,
stable-diffusion-webui's "PNG Info", sd-parsers): the prompt, a ``Negative prompt:`` line, then
one line of ``Key: value`` pairs. The XMP packet states, in IPTC's vocabulary, that the image is
``trainedAlgorithmicMedia`` (what the EU AI Act's Art. 50(2) asks to be machine-readable), with
the generation and style it came from.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

from PIL import Image, PngImagePlugin

from adapters.provenance.vocabulary import TRAINED_ALGORITHMIC_MEDIA
from ports.provenance import ProvenanceFacts

PARAMETERS_KEY = "parameters"
"""The tEXt keyword A1111 writes its infotext under."""
XMP_KEY = "XML:com.adobe.xmp"
"""The iTXt keyword of XMP in PNG (XMP specification part 3)."""
STYLELICENSE_NS = "urn:stylelicense:xmp:1.0#"
"""Our own XMP namespace: the generation and style ids."""
_IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_SAMPLERS = {"dpmsolver++": "DPM++ 2M"}
"""Our scheduler names as A1111 calls the same sampler (DPM-Solver++, multistep, order 2)."""


@dataclass(frozen=True)
class PngText:
    """What a PNG's metadata chunks say, read back (None where a chunk is missing)."""

    parameters: str | None
    digital_source_type: str | None
    generation_id: int | None
    style_id: int | None
    creator_tool: str | None


def parameters_text(facts: ProvenanceFacts, *, software: str, include_prompt: bool) -> str:
    """The A1111 infotext of one generation; without the prompt lines when ``include_prompt``
    is False (A1111's parser then reads an empty prompt)."""
    pairs: list[tuple[str, object]] = [
        ("Steps", facts.steps),
        ("Sampler", _SAMPLERS.get(facts.scheduler, facts.scheduler)),
        ("CFG scale", facts.guidance_scale),
        ("Seed", facts.seed),
        ("Size", f"{facts.width}x{facts.height}"),
        ("Model", facts.model),
    ]
    if facts.lora_checksum:
        style = f"style-{facts.style_id}" if facts.style_id is not None else "style"
        pairs.append(("Lora hashes", f"{style}: {facts.lora_checksum[:12]}"))
        pairs.append(("Lora weight", facts.lora_scale))
    if facts.style_id is not None:
        pairs.append(("Style id", facts.style_id))
    pairs.append(("Generation id", facts.generation_id))
    pairs.append(("Version", software))
    line = ", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs)
    if not include_prompt:
        return line
    prompt = " ".join(facts.prompt.split())
    negative = " ".join(facts.negative_prompt.split())
    return f"{prompt}\nNegative prompt: {negative}\n{line}"


def _quote(text: str) -> str:
    """A1111's quoting: a value holding a separator is written as a JSON string."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
"""Characters XML 1.0 cannot hold at all, escaped or not: one would make the packet unreadable."""


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("", text)


def xmp_packet(facts: ProvenanceFacts, *, software: str) -> str:
    """An XMP packet: IPTC digital source type, creator tool, the artist, generation and style."""
    attributes = {
        "Iptc4xmpExt:DigitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "xmp:CreatorTool": software,
        "stylelicense:GenerationId": str(facts.generation_id),
    }
    if facts.style_id is not None:
        attributes["stylelicense:StyleId"] = str(facts.style_id)
    rendered = "".join(
        f"\n    {name}={quoteattr(_xml_text(value))}" for name, value in attributes.items()
    )
    creator = ""
    if facts.artist:
        artist = escape(_xml_text(facts.artist))
        creator = f"\n   <dc:creator><rdf:Seq><rdf:li>{artist}</rdf:li></rdf:Seq></dc:creator>"
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        f' <rdf:RDF xmlns:rdf="{_RDF_NS}">\n'
        '  <rdf:Description rdf:about=""\n'
        f'    xmlns:Iptc4xmpExt="{_IPTC_EXT_NS}"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        f'    xmlns:stylelicense="{STYLELICENSE_NS}"{rendered}>{creator}\n'
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def encode_png(image: Image.Image, text: Mapping[str, str] | None = None) -> bytes:
    """PNG bytes of an image (lossless, zlib level 6), with ``parameters`` as tEXt (Latin-1
    when it can be, as A1111 writes it; else iTXt) and XMP as iTXt."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        if key == XMP_KEY or not _latin1(value):
            info.add_itxt(key, value)
        else:
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, pnginfo=info)
    return buffer.getvalue()


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def read_png_text(image: Image.Image) -> PngText:
    """The metadata chunks of an opened image (PNG text chunks; a JPEG's XMP where Pillow has
    it); any chunk may be missing or foreign."""
    info: Mapping[str, Any] = getattr(image, "text", None) or {}
    parameters = info.get(PARAMETERS_KEY)
    xmp = info.get(XMP_KEY) or image.info.get("xmp")
    fields = _xmp_fields(xmp) if xmp else {}
    return PngText(
        parameters=parameters if isinstance(parameters, str) else None,
        digital_source_type=fields.get(f"{{{_IPTC_EXT_NS}}}DigitalSourceType"),
        generation_id=_integer(fields.get(f"{{{STYLELICENSE_NS}}}GenerationId")),
        style_id=_integer(fields.get(f"{{{STYLELICENSE_NS}}}StyleId")),
        creator_tool=fields.get("{http://ns.adobe.com/xap/1.0/}CreatorTool"),
    )


def _xmp_fields(xmp: str | bytes) -> dict[str, str]:
    """The attributes and simple elements of every ``rdf:Description`` (XMP writes a property
    either way); an unparsable packet gives none."""
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    text = re.sub(r"<\?xpacket[^>]*\?>", "", text).strip()
    try:
        root = ElementTree.fromstring(text)  # noqa: S314 - expat, no external entities
    except ElementTree.ParseError:
        return {}
    fields: dict[str, str] = {}
    for description in root.iter(f"{{{_RDF_NS}}}Description"):
        fields.update(description.attrib)
        for child in description:
            if child.text and child.text.strip():
                fields.setdefault(child.tag, child.text.strip())
    return fields


def _integer(text: str | None) -> int | None:
    if text is None or not re.fullmatch(r"[0-9]{1,19}", text.strip()):
        return None
    return int(text)
