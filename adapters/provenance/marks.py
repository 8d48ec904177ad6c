"""ProvenanceMarks: the invisible mark, the PNG's metadata and C2PA content credentials, in
that order (each later mark covers what the earlier ones wrote: the credentials' hash binds
the pixels carrying the invisible mark and the metadata chunks)."""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from adapters.provenance.credentials import ContentCredentials, CredentialFacts
from adapters.provenance.invisible_mark import InvisibleMark, with_headroom
from adapters.provenance.png_metadata import (
    PARAMETERS_KEY,
    XMP_KEY,
    encode_png,
    parameters_text,
    xmp_packet,
)
from adapters.provenance.vocabulary import SOFTWARE_NAME, TRAINED_ALGORITHMIC_MEDIA, worker_version
from ports.provenance import MarkedImage, ProvenanceFacts

log = logging.getLogger(__name__)


class ProvenanceMarks:
    """The ``ProvenanceMarker`` of the worker.

    ``invisible_mark`` None: no invisible mark; ``credentials`` None: no content credentials
    (the start-up log says so). The metadata chunks are always written: they cost nothing.
    """

    def __init__(
        self,
        *,
        include_prompt: bool,
        invisible_mark: InvisibleMark | None,
        credentials: ContentCredentials | None,
        version: str | None = None,
    ) -> None:
        self._include_prompt = include_prompt
        self._invisible_mark = invisible_mark
        self._credentials = credentials
        self._version = version or worker_version()

    @property
    def software(self) -> str:
        """The worker as the marks name it: ``stylelicense-worker <version>``."""
        return f"{SOFTWARE_NAME} {self._version}"

    @property
    def marks(self) -> tuple[str, ...]:
        """The marks every image gets."""
        marks = ["metadata"]
        if self._invisible_mark is not None:
            marks.append("invisible-mark")
        if self._credentials is not None:
            marks.append("c2pa-development" if self._credentials.is_development else "c2pa")
        return tuple(marks)

    def mark(self, image: Image.Image, facts: ProvenanceFacts) -> MarkedImage:
        """The image with every configured mark, as PNG bytes; ``ProvenanceFailed`` when the
        credentials cannot be signed."""
        provenance: dict[str, Any] = {}
        if self._invisible_mark is not None:
            image, provenance["invisible_mark"] = _marked(
                self._invisible_mark, image, facts.generation_id
            )
        png = encode_png(
            image,
            {
                PARAMETERS_KEY: parameters_text(
                    facts, software=self.software, include_prompt=self._include_prompt
                ),
                XMP_KEY: xmp_packet(facts, software=self.software),
            },
        )
        provenance["metadata"] = {
            "chunks": [PARAMETERS_KEY, XMP_KEY],
            "prompt_included": self._include_prompt,
            "digital_source_type": TRAINED_ALGORITHMIC_MEDIA,
        }
        provenance["content_credentials"] = None
        if self._credentials is not None:
            # ProvenanceFailed (retryable) when the SDK cannot sign: nothing unsigned is stored.
            signed = self._credentials.sign_png(png, self._credential_facts(facts))
            png = signed.data
            provenance["content_credentials"] = {
                "standard": "C2PA",
                "manifest_label": signed.manifest_label,
                "signer": self._credentials.signer_name,
                "development_certificate": self._credentials.is_development,
                "bytes": signed.bytes_added,
            }
        return MarkedImage(png=png, provenance=provenance)

    def _credential_facts(self, facts: ProvenanceFacts) -> CredentialFacts:
        return CredentialFacts(
            generation_id=facts.generation_id,
            style_id=facts.style_id,
            base_model=facts.model,
            lora_checksum=facts.lora_checksum,
            artist=facts.artist,
            worker_version=self._version,
        )


def _marked(
    mark: InvisibleMark, image: Image.Image, generation_id: int
) -> tuple[Image.Image, dict[str, Any]]:
    """The image with the invisible mark, checked to read back, and what to report of it.

    A saturated picture (a white background) clips the mark away: it is marked again with
    headroom (pixels within 8 levels of 0 or 255 moved in). Neither an image too small for
    the mark nor an id beyond its payload can change by a retry: such an image is stored
    without the mark, and the metadata says why. ``verified`` False is logged: stored, but
    the mark did not read back.
    """
    try:
        marked = mark.embed(image, generation_id)
    except ValueError as exc:
        log.warning("generation %s: no invisible mark: %s", generation_id, exc)
        return image, {"skipped": str(exc)}
    headroom = not mark.reads(marked, generation_id)
    if headroom:
        marked = mark.embed(with_headroom(image), generation_id)
    verified = mark.reads(marked, generation_id)
    if not verified:
        log.warning("generation %s: the invisible mark does not read back", generation_id)
    return marked, {
        "method": mark.method,
        "payload": {"generation_id": generation_id},
        "verified": verified,
        "headroom": headroom,
    }
