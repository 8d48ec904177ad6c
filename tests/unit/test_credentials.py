"""Content credentials signed into PNGs with the real C2PA SDK, and read back with a verdict."""

from __future__ import annotations

import datetime
import io
import random
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image, PngImagePlugin

from adapters.provenance.credentials import (
    DEVELOPMENT_CERTIFICATE_WARNING,
    TRAINING_MINING_REASON,
    ContentCredentials,
    CredentialFacts,
    CredentialsConfigError,
    CredentialsReport,
    read_credentials,
)
from adapters.provenance.dev_certificate import (
    DEVELOPMENT_COMMON_NAME,
    DevelopmentChain,
    generate_development_chain,
)
from adapters.provenance.vocabulary import TRAINED_ALGORITHMIC_MEDIA
from domain.errors import ProvenanceFailed
from tests.unit.provenance_samples import (
    chunks,
    flip_middle_byte,
    one_pixel_changed,
    with_chunk_edited,
)

FACTS = CredentialFacts(
    generation_id=456,
    style_id=7,
    base_model="stable-diffusion-v1-5",
    lora_checksum="ab" * 32,
    artist="Ada Lovelace",
    worker_version="1.2.3",
)
BARE_FACTS = CredentialFacts(
    generation_id=457,
    style_id=None,
    base_model="stable-diffusion-v1-5",
    lora_checksum=None,
    artist=None,
    worker_version="1.2.3",
)
TRAINING_USES = (
    "cawg.ai_generative_training",
    "cawg.ai_training",
    "cawg.ai_inference",
    "cawg.data_mining",
)


def png_bytes(
    size: int = 64, seed: int = 1, pnginfo: PngImagePlugin.PngInfo | None = None
) -> bytes:
    """A PNG of seeded random pixels."""
    pixels = random.Random(seed).randbytes(size * size * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buffer, "PNG", pnginfo=pnginfo)
    return buffer.getvalue()


@pytest.fixture(scope="module", name="chain")
def fixture_chain() -> DevelopmentChain:
    return generate_development_chain()


@pytest.fixture(scope="module", name="credentials")
def fixture_credentials(chain: DevelopmentChain) -> ContentCredentials:
    return ContentCredentials(
        private_key_pem=chain.private_key_pem, certificate_chain_pem=chain.certificate_chain_pem
    )


@pytest.fixture(scope="module", name="signed_png")
def fixture_signed_png(credentials: ContentCredentials) -> bytes:
    return credentials.sign_png(png_bytes(), FACTS).data


@pytest.fixture(scope="module", name="report")
def fixture_report(signed_png: bytes) -> CredentialsReport:
    return read_credentials(signed_png, "image/png")


# --- signing with the development certificate ---------------------------------------------------


def test_a_development_signature_is_intact_and_only_untrusted(report: CredentialsReport) -> None:
    assert report.present
    assert report.state == "untrusted"
    assert report.validation_codes == ("signingCredential.untrusted",)
    assert report.signer == DEVELOPMENT_COMMON_NAME


def test_the_report_names_the_manifest_the_signer_returned(credentials: ContentCredentials) -> None:
    signed = credentials.sign_png(png_bytes(seed=2), FACTS)
    assert signed.manifest_label.startswith("urn:c2pa:")
    assert read_credentials(signed.data, "image/png").manifest_label == signed.manifest_label


def test_the_image_is_declared_created_by_a_trained_model(report: CredentialsReport) -> None:
    (created,) = report.assertions["c2pa.actions.v2"]["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert report.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert created["softwareAgent"] == {"name": "stylelicense-worker", "version": "1.2.3"}
    assert created["parameters"] == {
        "base_model": "stable-diffusion-v1-5",
        "lora_sha256": "ab" * 32,
        "style_id": 7,
        "generation_id": 456,
    }


def test_parameters_leave_out_what_the_generation_did_not_have(
    credentials: ContentCredentials,
) -> None:
    report = read_credentials(credentials.sign_png(png_bytes(), BARE_FACTS).data, "image/png")
    (created,) = report.assertions["c2pa.actions.v2"]["actions"]
    assert created["parameters"] == {"base_model": "stable-diffusion-v1-5", "generation_id": 457}


def test_the_artist_is_the_author_when_given(report: CredentialsReport) -> None:
    assert report.author == "Ada Lovelace"
    creative_work = report.assertions["stds.schema-org.CreativeWork"]
    assert creative_work["author"] == [{"@type": "Person", "name": "Ada Lovelace"}]


def test_no_author_without_an_artist(credentials: ContentCredentials) -> None:
    report = read_credentials(credentials.sign_png(png_bytes(), BARE_FACTS).data, "image/png")
    assert report.author is None
    assert "stds.schema-org.CreativeWork" not in report.assertions
    assert report.state == "untrusted"


def test_training_and_data_mining_are_not_allowed(report: CredentialsReport) -> None:
    entries = report.assertions["cawg.training-mining"]["entries"]
    assert sorted(entries) == sorted(TRAINING_USES)
    for use in TRAINING_USES:
        assert entries[use] == {"use": "notAllowed", "constraint_info": TRAINING_MINING_REASON}


def test_the_claim_names_the_worker_and_the_generation(report: CredentialsReport) -> None:
    assert report.title == "generation 456.png"
    assert report.claim_generator == "stylelicense-worker 1.2.3"


def test_no_thumbnail_by_default_and_one_when_asked(chain: DevelopmentChain) -> None:
    png = png_bytes(size=128)
    plain = ContentCredentials(
        private_key_pem=chain.private_key_pem, certificate_chain_pem=chain.certificate_chain_pem
    ).sign_png(png, FACTS)
    with_thumbnail = ContentCredentials(
        private_key_pem=chain.private_key_pem,
        certificate_chain_pem=chain.certificate_chain_pem,
        thumbnail=True,
    ).sign_png(png, FACTS)
    assert b"c2pa.thumbnail.claim" not in plain.data
    assert b"c2pa.thumbnail.claim" in with_thumbnail.data
    assert read_credentials(with_thumbnail.data, "image/png").state == "untrusted"


def test_a_512_pixel_png_grows_by_a_few_kilobytes(credentials: ContentCredentials) -> None:
    png = png_bytes(size=512)
    signed = credentials.sign_png(png, FACTS)
    assert signed.bytes_added == len(signed.data) - len(png)
    assert 2_000 < signed.bytes_added < 8_000


def test_text_chunks_survive_signing(credentials: ContentCredentials) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse at dusk, steps 30, seed 42")
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    info.add_itxt("XML:com.adobe.xmp", xmp)
    signed = credentials.sign_png(png_bytes(pnginfo=info), FACTS).data
    with Image.open(io.BytesIO(signed)) as image:
        assert image.text["parameters"] == "a lighthouse at dusk, steps 30, seed 42"
        assert image.text["XML:com.adobe.xmp"] == xmp
    assert read_credentials(signed, "image/png").state == "untrusted"


def test_threads_can_sign_at_once(credentials: ContentCredentials) -> None:
    reports: list[CredentialsReport] = []

    def sign_some(seed: int) -> None:
        for offset in range(3):
            signed = credentials.sign_png(png_bytes(size=32, seed=seed * 10 + offset), FACTS)
            reports.append(read_credentials(signed.data, "image/png"))

    threads = [threading.Thread(target=sign_some, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [report.state for report in reports] == ["untrusted"] * 12
    assert len({report.manifest_label for report in reports}) == 12


def test_a_signature_whose_root_is_trusted_is_valid(
    chain: DevelopmentChain, signed_png: bytes
) -> None:
    report = read_credentials(signed_png, "image/png", trust_anchors_pem=chain.root_certificate_pem)
    assert report.state == "valid"
    assert not report.validation_codes


def test_another_root_does_not_make_it_trusted(signed_png: bytes) -> None:
    stranger = generate_development_chain().root_certificate_pem
    report = read_credentials(signed_png, "image/png", trust_anchors_pem=stranger)
    assert report.state == "untrusted"


# --- tampering and other inputs ------------------------------------------------------------------


def test_a_byte_changed_in_the_image_data_is_tampering(signed_png: bytes) -> None:
    tampered = with_chunk_edited(signed_png, b"IDAT", flip_middle_byte)
    report = read_credentials(tampered, "image/png")
    assert report.state == "tampered"
    assert "assertion.dataHash.mismatch" in report.validation_codes


def test_one_pixel_changed_and_re_encoded_is_tampering(signed_png: bytes) -> None:
    tampered = one_pixel_changed(signed_png)
    assert b"caBX" in dict(chunks(tampered))
    assert read_credentials(tampered, "image/png").state == "tampered"


def test_a_changed_claim_is_tampering(signed_png: bytes) -> None:
    tampered = with_chunk_edited(signed_png, b"caBX", flip_middle_byte)
    assert read_credentials(tampered, "image/png").state == "tampered"


def test_an_unreadable_manifest_is_present_but_invalid(signed_png: bytes) -> None:
    def wipe_header(manifest: bytes) -> bytes:
        return manifest[:40] + bytes(20) + manifest[60:]

    report = read_credentials(with_chunk_edited(signed_png, b"caBX", wipe_header), "image/png")
    assert report.present
    assert report.state == "invalid"
    assert report.error


def test_an_unsigned_png_has_none() -> None:
    report = read_credentials(png_bytes(), "image/png")
    assert not report.present
    assert report.state == "none"


def test_an_unsigned_jpeg_has_none() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, "JPEG")
    assert read_credentials(buffer.getvalue(), "image/jpeg").state == "none"


@pytest.mark.parametrize(
    ("data", "mime_type"),
    [
        (b"", "image/png"),
        (random.Random(3).randbytes(4096), "image/png"),
        (random.Random(4).randbytes(4096), "image/jpeg"),
        (b"\x89PNG\r\n\x1a\n" + b"x" * 100, "image/png"),
        (b"GIF89a", "text/plain"),
    ],
)
def test_garbage_has_none_and_does_not_raise(data: bytes, mime_type: str) -> None:
    report = read_credentials(data, mime_type)
    assert (report.present, report.state) == (False, "none")


# --- configuration -------------------------------------------------------------------------------


def test_development_credentials_say_so() -> None:
    credentials = ContentCredentials.development()
    assert credentials.is_development
    assert credentials.signer_name == DEVELOPMENT_COMMON_NAME
    assert "DEVELOPMENT" in DEVELOPMENT_CERTIFICATE_WARNING


def test_a_key_and_chain_from_files_sign(chain: DevelopmentChain, tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(chain.private_key_pem)
    (tmp_path / "chain.pem").write_bytes(chain.certificate_chain_pem)
    credentials = ContentCredentials.from_files(
        key_file=tmp_path / "key.pem", certificate_file=tmp_path / "chain.pem"
    )
    assert credentials.is_development
    signed = credentials.sign_png(png_bytes(), FACTS)
    assert read_credentials(signed.data, "image/png").state == "untrusted"


def test_pem_text_and_an_sec1_key_are_accepted(chain: DevelopmentChain) -> None:
    key = serialization.load_pem_private_key(chain.private_key_pem, password=None)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    credentials = ContentCredentials(
        private_key_pem=sec1.decode(),
        certificate_chain_pem=chain.certificate_chain_pem.decode(),
        algorithm="ES256",
    )
    assert read_credentials(credentials.sign_png(png_bytes(), FACTS).data, "image/png").present


def test_a_missing_file_names_the_setting_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(CredentialsConfigError, match="key_file: .*absent.pem") as raised:
        ContentCredentials.from_files(
            key_file=tmp_path / "absent.pem", certificate_file=tmp_path / "chain.pem"
        )
    assert raised.value.setting == "key_file"


def test_a_key_of_another_certificate_is_refused(chain: DevelopmentChain) -> None:
    stranger = generate_development_chain().private_key_pem
    with pytest.raises(CredentialsConfigError, match="does not match") as raised:
        ContentCredentials(
            private_key_pem=stranger, certificate_chain_pem=chain.certificate_chain_pem
        )
    assert raised.value.setting == "private_key_pem"


def test_a_mismatched_key_file_names_the_file(chain: DevelopmentChain, tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(generate_development_chain().private_key_pem)
    (tmp_path / "chain.pem").write_bytes(chain.certificate_chain_pem)
    with pytest.raises(CredentialsConfigError, match="key_file: .*key.pem does not match"):
        ContentCredentials.from_files(
            key_file=tmp_path / "key.pem", certificate_file=tmp_path / "chain.pem"
        )


def test_a_chain_with_the_root_first_is_refused(chain: DevelopmentChain) -> None:
    end_entity = chain.certificate_chain_pem.removesuffix(chain.root_certificate_pem)
    with pytest.raises(
        CredentialsConfigError,
        match="matches certificate 2 of the chain: put the end-entity one first",
    ):
        ContentCredentials(
            private_key_pem=chain.private_key_pem,
            certificate_chain_pem=chain.root_certificate_pem + end_entity,
        )


def test_swapped_key_and_chain_are_named(chain: DevelopmentChain) -> None:
    with pytest.raises(CredentialsConfigError, match="swapped"):
        ContentCredentials(
            private_key_pem=chain.certificate_chain_pem,
            certificate_chain_pem=chain.private_key_pem,
        )


def test_an_encrypted_key_is_refused(chain: DevelopmentChain) -> None:
    key = serialization.load_pem_private_key(chain.private_key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CredentialsConfigError, match="private_key_pem: is encrypted"):
        ContentCredentials(
            private_key_pem=encrypted, certificate_chain_pem=chain.certificate_chain_pem
        )


def test_an_expired_certificate_is_refused() -> None:
    expired = generate_development_chain(validity=datetime.timedelta(minutes=-30))
    with pytest.raises(
        CredentialsConfigError, match="certificate_chain_pem: starts with .* which expired"
    ):
        ContentCredentials(
            private_key_pem=expired.private_key_pem,
            certificate_chain_pem=expired.certificate_chain_pem,
        )


def test_an_unknown_algorithm_is_refused(chain: DevelopmentChain) -> None:
    with pytest.raises(CredentialsConfigError, match="algorithm: 'rs256' is not one of") as raised:
        ContentCredentials(
            private_key_pem=chain.private_key_pem,
            certificate_chain_pem=chain.certificate_chain_pem,
            algorithm="rs256",
        )
    assert raised.value.setting == "algorithm"


def test_an_algorithm_the_key_cannot_use_is_refused(chain: DevelopmentChain) -> None:
    with pytest.raises(CredentialsConfigError, match="es384 cannot sign with this key"):
        ContentCredentials(
            private_key_pem=chain.private_key_pem,
            certificate_chain_pem=chain.certificate_chain_pem,
            algorithm="es384",
        )


def test_a_timestamp_url_must_be_http(chain: DevelopmentChain) -> None:
    with pytest.raises(CredentialsConfigError, match="timestamp_url"):
        ContentCredentials(
            private_key_pem=chain.private_key_pem,
            certificate_chain_pem=chain.certificate_chain_pem,
            timestamp_url="ftp://tsa.example",
        )


def test_the_timestamp_authority_is_asked_when_signing(chain: DevelopmentChain) -> None:
    credentials = ContentCredentials(
        private_key_pem=chain.private_key_pem,
        certificate_chain_pem=chain.certificate_chain_pem,
        timestamp_url="http://127.0.0.1:9/timestamp",  # the discard port: nothing answers
    )
    with pytest.raises(ProvenanceFailed, match="127.0.0.1:9") as raised:
        credentials.sign_png(png_bytes(), FACTS)
    assert raised.value.retryable


def test_trust_anchors_the_sdk_cannot_parse_are_a_configuration_error(signed_png: bytes) -> None:
    with pytest.raises(CredentialsConfigError, match="trust_anchors_pem"):
        read_credentials(signed_png, "image/png", trust_anchors_pem=b"not a certificate")


def test_a_certificate_the_sdk_refuses_fails_at_construction() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    self_signed = _self_signed_certificate(key)
    with pytest.raises(
        CredentialsConfigError, match="certificate_chain_pem: is refused by the C2PA SDK"
    ):
        ContentCredentials(
            private_key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            certificate_chain_pem=self_signed,
        )


def _self_signed_certificate(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An end-entity certificate that signs itself, which c2pa-rs refuses to sign with."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)
