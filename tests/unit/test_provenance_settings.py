"""Provenance as the settings configure it: what the worker signs with, what it says at start,
and the start-up check that stops it on a key it cannot sign with."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapters.provenance.configured import (
    ProvenanceConfigError,
    configured_credentials,
    configured_invisible_mark,
)
from adapters.provenance.credentials import ContentCredentials
from adapters.provenance.dev_certificate import generate_development_chain
from app.settings import SettingsError, load_settings
from containers import build_container


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # no stray .env is read


def test_by_default_every_image_gets_every_mark_signed_with_a_development_certificate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    container = build_container(load_settings().container_config())
    with caplog.at_level(logging.WARNING):
        marks = container.provenance().marks
    assert marks == ("metadata", "invisible-mark", "c2pa-development")
    assert "DEVELOPMENT certificate" in caplog.text and "C2PA_WITHOUT_CERTIFICATE" in caplog.text


def test_unsigned_and_without_the_mark_only_the_metadata_is_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(c2pa_without_certificate="unsigned", provenance_invisible_mark=False)
    with caplog.at_level(logging.WARNING):
        marks = build_container(settings.container_config()).provenance().marks
    assert marks == ("metadata",)
    assert "images carry no content credentials" in caplog.text
    assert "images carry no invisible mark" in caplog.text


def configure(key: Path, certificate: Path) -> ContentCredentials | None:
    return configured_credentials(
        key_file=str(key),
        certificate_file=str(certificate),
        algorithm="es256",
        timestamp_url=None,
        without_certificate="unsigned",
        thumbnail=False,
    )


def test_configured_files_are_what_signs_and_a_development_chain_among_them_is_named(
    tmp_path: Path,
) -> None:
    chain = generate_development_chain()
    key, certificate = tmp_path / "key.pem", tmp_path / "chain.pem"
    key.write_bytes(chain.private_key_pem)
    certificate.write_bytes(chain.certificate_chain_pem)
    credentials = configure(key, certificate)
    # Not "unsigned": files are configured. A development chain written to files is still
    # recognised as one (the marks and the metadata say so).
    assert credentials is not None and credentials.is_development
    assert credentials.signer_name == "StyleLicense worker DEVELOPMENT certificate - not trusted"


@pytest.mark.parametrize(
    ("which", "variable"),
    [("key", "C2PA_SIGNING_KEY_FILE"), ("certificate", "C2PA_CERTIFICATE_FILE")],
)
def test_a_key_or_chain_that_cannot_sign_names_its_variable(
    tmp_path: Path, which: str, variable: str
) -> None:
    chain, other = generate_development_chain(), generate_development_chain()
    key, certificate = tmp_path / "key.pem", tmp_path / "chain.pem"
    key.write_bytes(chain.private_key_pem)
    certificate.write_bytes(chain.certificate_chain_pem)
    (key if which == "key" else certificate).write_text("not PEM")
    with pytest.raises(ProvenanceConfigError, match=variable) as raised:
        configure(key, certificate)
    assert "PRIVATE KEY" not in str(raised.value)
    key.write_bytes(other.private_key_pem)  # another certificate's key
    certificate.write_bytes(chain.certificate_chain_pem)
    with pytest.raises(ProvenanceConfigError, match="C2PA_"):
        configure(key, certificate)


def test_the_worker_s_start_check_stops_on_such_a_key(tmp_path: Path) -> None:
    from app.worker import start  # pylint: disable=import-outside-toplevel

    missing = tmp_path / "missing.pem"
    settings = load_settings(
        c2pa_signing_key_file=str(missing),
        c2pa_certificate_file=str(missing),
        task_source_backend="memory",
        storage_backend="local",
        local_storage_dir=str(tmp_path),
    )
    problem = start(build_container(settings.container_config()))
    assert problem is not None and problem.startswith("provenance: C2PA_SIGNING_KEY_FILE")


def test_a_key_without_its_chain_is_refused_when_the_settings_are_read() -> None:
    with pytest.raises(SettingsError, match="C2PA_SIGNING_KEY_FILE and C2PA_CERTIFICATE_FILE"):
        load_settings(c2pa_signing_key_file="/run/secrets/key.pem")
    with pytest.raises(SettingsError, match="set together"):
        load_settings(c2pa_certificate_file="/run/secrets/chain.pem")


def test_a_minimum_size_below_the_mark_s_tile_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert configured_invisible_mark(enabled=True, min_image_size=256) is not None
        assert not caplog.text
        assert configured_invisible_mark(enabled=True, min_image_size=128) is not None
    assert "MIN_IMAGE_SIZE=128" in caplog.text and "256 px" in caplog.text
