"""ProvenanceMarks with the real SDK and the real mark: every image carries what the settings
say, and ``inspect``'s code reads each mark back."""

from __future__ import annotations

import dataclasses
import datetime
import io
import socket

import pytest
from PIL import Image

from adapters.provenance.configured import warn_of_expiry
from adapters.provenance.credentials import ContentCredentials
from adapters.provenance.dev_certificate import DevelopmentChain, generate_development_chain
from adapters.provenance.inspection import inspect_image
from adapters.provenance.invisible_mark import MIN_SIDE, InvisibleMark
from adapters.provenance.marks import ProvenanceMarks
from adapters.provenance.vocabulary import TRAINED_ALGORITHMIC_MEDIA
from domain.errors import ErrorCode, ProvenanceFailed
from ports.provenance import ProvenanceMarker
from tests.unit.provenance_samples import facts, one_pixel_changed, scene

FACTS = facts(width=256, height=256)


@pytest.fixture(scope="module")
def chain() -> DevelopmentChain:
    return generate_development_chain()


@pytest.fixture(scope="module")
def credentials(chain: DevelopmentChain) -> ContentCredentials:
    return ContentCredentials(
        private_key_pem=chain.private_key_pem, certificate_chain_pem=chain.certificate_chain_pem
    )


def test_every_image_carries_the_three_marks_and_inspect_proves_them(
    credentials: ContentCredentials,
) -> None:
    marks = ProvenanceMarks(
        include_prompt=False, invisible_mark=InvisibleMark(), credentials=credentials, version="9.9"
    )
    assert isinstance(marks, ProvenanceMarker)
    assert marks.marks == ("metadata", "invisible-mark", "c2pa-development")

    marked = marks.mark(scene(), FACTS)

    inspection = inspect_image(marked.png, invisible_mark=InvisibleMark())
    assert inspection.credentials.state == "untrusted" and inspection.verified()
    assert not inspection.verified(require_trusted=True)
    assert inspection.credentials.author == "Ada Lovelace"
    assert inspection.credentials.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert inspection.text.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert inspection.text.generation_id == 456 and inspection.text.style_id == 123
    assert inspection.text.creator_tool == "stylelicense-worker 9.9"
    assert inspection.text.parameters is not None
    assert (
        "Seed: 42" in inspection.text.parameters and "watercolor" not in inspection.text.parameters
    )
    assert inspection.mark is not None and inspection.mark.generation_id == 456
    assert marked.provenance == {
        "invisible_mark": {
            "method": InvisibleMark().method,
            "payload": {"generation_id": 456},
            "verified": True,
            "headroom": False,
        },
        "metadata": {
            "chunks": ["parameters", "XML:com.adobe.xmp"],
            "prompt_included": False,
            "digital_source_type": TRAINED_ALGORITHMIC_MEDIA,
        },
        "content_credentials": {
            "standard": "C2PA",
            "manifest_label": inspection.credentials.manifest_label,
            "signer": credentials.signer_name,
            "development_certificate": True,
            "bytes": marked.provenance["content_credentials"]["bytes"],
        },
    }
    assert 0 < marked.provenance["content_credentials"]["bytes"] < 20_000


def test_a_white_background_gets_headroom_and_its_mark_reads() -> None:
    marks = ProvenanceMarks(include_prompt=False, invisible_mark=InvisibleMark(), credentials=None)
    white = Image.new("RGB", (256, 256), (255, 255, 255))
    assert not InvisibleMark().reads(InvisibleMark().embed(white, 456), 456)  # clipped away

    marked = marks.mark(white, FACTS)

    assert marked.provenance["invisible_mark"]["verified"] is True
    assert marked.provenance["invisible_mark"]["headroom"] is True
    inspection = inspect_image(marked.png, invisible_mark=InvisibleMark())
    assert inspection.mark is not None and inspection.mark.generation_id == 456
    with Image.open(io.BytesIO(marked.png)) as stored:
        lowest, highest = stored.convert("RGB").getextrema()[2]  # blue: made room, then marked
    assert 240 <= lowest and highest <= 255


def test_a_certificate_near_its_end_is_warned_of_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    short = generate_development_chain(validity=datetime.timedelta(days=10))
    credentials = ContentCredentials(
        private_key_pem=short.private_key_pem, certificate_chain_pem=short.certificate_chain_pem
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    assert warn_of_expiry(credentials, now=now)
    assert "expires at" in caplog.text and "C2PA_CERTIFICATE_FILE" in caplog.text
    assert not warn_of_expiry(credentials, now=now - datetime.timedelta(days=21))


def test_one_changed_pixel_is_reported_as_tampered(credentials: ContentCredentials) -> None:
    marks = ProvenanceMarks(include_prompt=True, invisible_mark=None, credentials=credentials)
    png = marks.mark(scene(), FACTS).png
    tampered = one_pixel_changed(png)

    inspection = inspect_image(tampered, invisible_mark=None)
    assert inspection.credentials.state == "tampered" and not inspection.verified()
    assert inspection.text.parameters is not None and "watercolor, portrait" in (
        inspection.text.parameters
    )


def test_unsigned_and_unmarked_images_carry_only_the_metadata() -> None:
    marks = ProvenanceMarks(include_prompt=False, invisible_mark=None, credentials=None)
    assert marks.marks == ("metadata",)
    marked = marks.mark(scene(), FACTS)
    assert "invisible_mark" not in marked.provenance
    assert marked.provenance["content_credentials"] is None
    inspection = inspect_image(marked.png, invisible_mark=InvisibleMark())
    assert inspection.credentials.state == "none" and not inspection.verified()
    assert inspection.mark is not None and inspection.mark.generation_id is None
    assert inspection.text.generation_id == 456


def test_an_image_too_small_for_the_mark_is_stored_without_it_and_says_why() -> None:
    marks = ProvenanceMarks(include_prompt=False, invisible_mark=InvisibleMark(), credentials=None)
    small = scene(MIN_SIDE - 8)
    marked = marks.mark(small, dataclasses.replace(FACTS, width=small.width))
    assert set(marked.provenance["invisible_mark"]) == {"skipped"}
    with Image.open(io.BytesIO(marked.png)) as stored:
        assert stored.convert("RGB").tobytes() == small.tobytes()


def test_a_signature_that_cannot_be_made_fails_the_marking(chain: DevelopmentChain) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    unreachable = ContentCredentials(
        private_key_pem=chain.private_key_pem,
        certificate_chain_pem=chain.certificate_chain_pem,
        timestamp_url=f"http://127.0.0.1:{port}/tsa",
    )
    marks = ProvenanceMarks(include_prompt=False, invisible_mark=None, credentials=unreachable)
    with pytest.raises(ProvenanceFailed) as raised:
        marks.mark(scene(), FACTS)
    assert raised.value.code is ErrorCode.PROVENANCE_ERROR and raised.value.retryable
