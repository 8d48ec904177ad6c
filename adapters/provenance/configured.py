"""The provenance adapters as the settings configure them (the container's factories): checked
at start-up, so a bad key or certificate stops the worker before it takes a job."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from adapters.provenance.credentials import (
    DEVELOPMENT_CERTIFICATE_WARNING,
    ContentCredentials,
    CredentialsConfigError,
)
from adapters.provenance.invisible_mark import MIN_SIDE, InvisibleMark

log = logging.getLogger(__name__)

SETTING_NAMES = {
    "key_file": "C2PA_SIGNING_KEY_FILE",
    "certificate_file": "C2PA_CERTIFICATE_FILE",
    "private_key_pem": "C2PA_SIGNING_KEY_FILE",
    "certificate_chain_pem": "C2PA_CERTIFICATE_FILE",
    "algorithm": "C2PA_SIGNING_ALGORITHM",
    "timestamp_url": "C2PA_TIMESTAMP_URL",
}
"""The credentials' parameter names as the environment variables that set them."""


EXPIRY_WARNING = datetime.timedelta(days=30)
"""How long before the signing certificate expires the worker warns at start-up."""


class ProvenanceConfigError(ValueError):
    """A provenance setting the worker cannot sign with; the message names the variable."""


def configured_credentials(
    *,
    key_file: str | None,
    certificate_file: str | None,
    algorithm: str,
    timestamp_url: str | None,
    without_certificate: str,
    thumbnail: bool,
) -> ContentCredentials | None:
    """The signer of the content credentials: the configured key and chain; else, as
    ``without_certificate`` says, a generated development certificate or none (logged).
    ``ProvenanceConfigError`` names the variable of a key or chain that cannot sign."""
    if key_file and certificate_file:
        try:
            credentials = ContentCredentials.from_files(
                key_file=Path(key_file),
                certificate_file=Path(certificate_file),
                algorithm=algorithm,
                timestamp_url=timestamp_url,
                thumbnail=thumbnail,
            )
        except CredentialsConfigError as exc:
            name = SETTING_NAMES.get(exc.setting, exc.setting)
            raise ProvenanceConfigError(f"{name}: {exc.problem}") from None
        log.info("content credentials are signed by %s", credentials.signer_name)
        warn_of_expiry(credentials, now=datetime.datetime.now(datetime.timezone.utc))
        return credentials
    if without_certificate == "unsigned":
        log.warning(
            "no C2PA signing certificate is configured (C2PA_SIGNING_KEY_FILE,"
            " C2PA_CERTIFICATE_FILE) and C2PA_WITHOUT_CERTIFICATE=unsigned: images carry no"
            " content credentials"
        )
        return None
    log.warning(
        "%s (set C2PA_SIGNING_KEY_FILE and C2PA_CERTIFICATE_FILE, or"
        " C2PA_WITHOUT_CERTIFICATE=unsigned)",
        DEVELOPMENT_CERTIFICATE_WARNING,
    )
    return ContentCredentials.development(thumbnail=thumbnail)


def warn_of_expiry(credentials: ContentCredentials, *, now: datetime.datetime) -> bool:
    """Log a warning when the signing certificate expires within ``EXPIRY_WARNING``: once it
    has, every job fails with PROVENANCE_ERROR until it is replaced. True when warned."""
    left = credentials.expires_at - now
    if left > EXPIRY_WARNING:
        return False
    log.warning(
        "the C2PA signing certificate (C2PA_CERTIFICATE_FILE) expires at %s, in %s days: every"
        " job fails with PROVENANCE_ERROR from then on; replace it before",
        credentials.expires_at.isoformat(),
        left.days,
    )
    return True


def configured_invisible_mark(*, enabled: bool, min_image_size: int) -> InvisibleMark | None:
    """The invisible mark, or None when ``PROVENANCE_INVISIBLE_MARK`` is off; a warning when
    ``MIN_IMAGE_SIZE`` admits images too small to carry it."""
    if not enabled:
        log.warning("PROVENANCE_INVISIBLE_MARK=false: images carry no invisible mark")
        return None
    if min_image_size < MIN_SIDE:
        log.warning(
            "MIN_IMAGE_SIZE=%s: images narrower or lower than %s px carry no invisible mark",
            min_image_size,
            MIN_SIDE,
        )
    return InvisibleMark()
