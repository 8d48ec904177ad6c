"""Storage references: the forms a message may name an object in, turned into (bucket, key).

The backend stores what its upload code returns (a public URL such as ``blob.public_url``), an
``s3://bucket/key`` URI, or a bare key; ``parse_reference`` accepts all of them without any
network call, so a bad reference is refused before a job takes a GPU slot. Both storage adapters
use ``ObjectReferences``, which adds the default bucket of each kind of reference and the
allow-list of buckets (S3_ALLOWED_BUCKETS).

Refusals are ``InvalidRequest`` whose message starts with the reference as sent (shortened, and
without a query string, which may hold a presigned URL's signature); the caller prefixes the
message field's name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from domain.errors import InvalidRequest
from ports.storage import ReferenceKind

GCS_ENDPOINT_HOST = "storage.googleapis.com"
"""The host of Google Cloud Storage's S3-compatible XML API (HMAC keys)."""
MAX_KEY_BYTES = 1024
"""S3's limit on a key, in UTF-8 bytes."""
MAX_REFERENCE_CHARS = 8192
"""Longest reference parsed at all; room for a presigned URL's query string."""
MAX_SHOWN_CHARS = 120
"""How much of a refused reference its error message repeats."""

_DEFAULT_PORTS = {"http": 80, "https": 443}
_AWS_PATH_STYLE_HOST = re.compile(r"s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com")
_AWS_VIRTUAL_HOST = re.compile(r"(?P<bucket>.+)\.s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_IPV4_SHAPE = re.compile(r"\d+\.\d+\.\d+\.\d+")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ObjectLocation:
    """Where a reference points: a bucket and a key in it."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """``s3://bucket/key``: how error messages name the object (never an endpoint URL)."""
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class _Origin:
    """Scheme, host and port of a URL (default ports made explicit), and its path."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def of(cls, parts: SplitResult) -> _Origin:
        """The origin of a split URL; ``ValueError`` for an invalid port."""
        scheme = parts.scheme.lower()
        return cls(
            scheme=scheme,
            host=(parts.hostname or "").lower(),
            port=parts.port or _DEFAULT_PORTS.get(scheme, 0),
            path=parts.path,
        )

    def same_server(self, other: _Origin) -> bool:
        """Whether both URLs reach the same server the same way."""
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)

    def rest_of_path(self, other: _Origin) -> str | None:
        """The (still percent-encoded) path of ``self`` after ``other``'s path, if under it."""
        if not self.same_server(other):
            return None
        prefix = other.path.rstrip("/") + "/"
        return self.path[len(prefix) :] if self.path.startswith(prefix) else None


def is_gcs_endpoint(endpoint_url: str | None) -> bool:
    """Whether the endpoint is Google Cloud Storage's S3-compatible XML API."""
    if not endpoint_url:
        return False
    try:
        return (urlsplit(endpoint_url).hostname or "").lower() == GCS_ENDPOINT_HOST
    except ValueError:
        return False


def parse_reference(
    ref: str,
    *,
    default_bucket: str | None,
    endpoint_url: str | None,
    public_base_url: str | None,
    output_bucket: str,
) -> tuple[str, str]:
    """``(bucket, key)`` of a reference in any accepted form; ``InvalidRequest`` otherwise.

    ``default_bucket`` holds bare keys (None: a bare key is refused); ``public_base_url``
    (S3_PUBLIC_BASE_URL) maps to ``output_bucket``, as in the result URLs the worker sends.
    AWS URLs of any region are accepted: a bucket name is global, the region only routes.
    """
    gcs = is_gcs_endpoint(endpoint_url)
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest(f"{_shown(ref)} is not a storage reference: {_forms(gcs)}")
    if len(ref) > MAX_REFERENCE_CHARS:
        raise InvalidRequest(
            f"{_shown(ref)} is {len(ref)} characters long; a storage reference has at most"
            f" {MAX_REFERENCE_CHARS}"
        )
    scheme = ref.split("://", 1)[0].lower() if "://" in ref else None
    if scheme == "s3":
        bucket, key = _bucket_and_key(ref, ref[len("s3://") :], decode=False)
    elif scheme == "gs":
        if not gcs:
            raise InvalidRequest(
                f"{_shown(ref)}: gs:// references need AWS_S3_ENDPOINT_URL="
                f"https://{GCS_ENDPOINT_HOST} (Cloud Storage's S3-compatible XML API);"
                " use s3://bucket/key"
            )
        bucket, key = _bucket_and_key(ref, ref[len("gs://") :], decode=False)
    elif scheme in ("http", "https"):
        named, key = _parse_url(
            ref, endpoint_url=endpoint_url, public_base_url=public_base_url, gcs=gcs
        )
        if named is None:
            _check_key(ref, key)
            return output_bucket, key
        bucket = named
    elif scheme is not None:
        raise InvalidRequest(f"{_shown(ref)} is not a storage reference: {_forms(gcs)}")
    else:
        if default_bucket is None:
            raise InvalidRequest(
                f"{_shown(ref)} is a bare key: a bare key needs S3_MODELS_BUCKET,"
                " or send s3://bucket/key"
            )
        key = ref.lstrip("/")
        _check_key(ref, key)
        return default_bucket, key
    check_bucket_name(ref, bucket, gcs=gcs)
    _check_key(ref, key)
    return bucket, key


def check_bucket_name(ref: str, bucket: str, *, gcs: bool = False) -> None:
    """Refuse a bucket name S3 (or, on its endpoint, Cloud Storage) would refuse."""
    pattern = _GCS_BUCKET if gcs else _S3_BUCKET
    valid = (
        pattern.fullmatch(bucket) is not None
        and ".." not in bucket
        and not _is_ip_address(bucket)
        and all(len(part) <= 63 for part in bucket.split("."))
    )
    if not valid:
        rules = "lowercase letters, digits, dots, hyphens" + (", underscores" if gcs else "")
        raise InvalidRequest(
            f"{_shown(ref)}: {_shown(bucket)} is not a valid bucket name (3-63 characters:"
            f" {rules}; starting and ending with a letter or digit; not an IP address)"
        )


def _parse_url(
    ref: str, *, endpoint_url: str | None, public_base_url: str | None, gcs: bool
) -> tuple[str | None, str]:
    """``(bucket, key)`` of an http(s) reference; bucket None: the public base URL's bucket."""
    try:
        parts = urlsplit(ref)
        origin = _Origin.of(parts)
    except ValueError:
        raise InvalidRequest(f"{_shown(ref)} is not a valid URL: {_forms(gcs)}") from None
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(f"{_shown(ref)}: a storage URL must not carry credentials")
    public_base = _origin_or_none(public_base_url)
    rest = origin.rest_of_path(public_base) if public_base else None
    if rest is not None:
        return None, _decoded(ref, rest)
    endpoint = _origin_or_none(endpoint_url)
    rest = origin.rest_of_path(endpoint) if endpoint else None
    if rest is not None:
        return _bucket_and_key(ref, rest, decode=True)
    if _AWS_PATH_STYLE_HOST.fullmatch(origin.host):
        return _bucket_and_key(ref, origin.path.removeprefix("/"), decode=True)
    virtual = _AWS_VIRTUAL_HOST.fullmatch(origin.host)
    if virtual is not None:
        return virtual["bucket"], _decoded(ref, origin.path.removeprefix("/"))
    if origin.host == GCS_ENDPOINT_HOST and not gcs:
        raise InvalidRequest(
            f"{_shown(ref)}: Cloud Storage URLs need AWS_S3_ENDPOINT_URL=https://"
            f"{GCS_ENDPOINT_HOST} (its S3-compatible XML API); use s3://bucket/key"
        )
    raise InvalidRequest(f"{_shown(ref)} is not a storage reference: {_forms(gcs)}")


def _origin_or_none(url: str | None) -> _Origin | None:
    """The origin of a configured URL; None when unset or unparseable (it then matches nothing)."""
    if not url:
        return None
    try:
        return _Origin.of(urlsplit(url))
    except ValueError:
        return None


def _bucket_and_key(ref: str, path: str, *, decode: bool) -> tuple[str, str]:
    """Split ``bucket/key``; URL paths are percent-decoded, URIs are taken literally."""
    bucket, _, key = path.partition("/")
    if decode:
        return _decoded(ref, bucket), _decoded(ref, key)
    return bucket, key


def _decoded(ref: str, text: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{_shown(ref)}: its path is not percent-encoded UTF-8") from None


def _check_key(ref: str, key: str) -> None:
    if not key:
        raise InvalidRequest(f"{_shown(ref)} names no object: send s3://bucket/key")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidRequest(f"{_shown(ref)}: its key is longer than {MAX_KEY_BYTES} bytes")
    if ".." in key.split("/"):
        raise InvalidRequest(f"{_shown(ref)}: '..' is not allowed in a key")
    if _CONTROL_CHARACTERS.search(key):
        raise InvalidRequest(f"{_shown(ref)}: control characters are not allowed in a key")


def _is_ip_address(name: str) -> bool:
    if _IPV4_SHAPE.fullmatch(name):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _forms(gcs: bool) -> str:
    """The accepted forms, for error messages (setting names, never their values)."""
    gcs_forms = "gs://bucket/key, " if gcs else ""
    return (
        f"use s3://bucket/key, {gcs_forms}a key in the default bucket,"
        " https://bucket.s3.amazonaws.com/key, https://s3.amazonaws.com/bucket/key,"
        " <AWS_S3_ENDPOINT_URL>/bucket/key or <S3_PUBLIC_BASE_URL>/key"
    )


def _shown(value: object) -> str:
    """A short, quoted echo of a refused value: no query string, no URL credentials."""
    text = value if isinstance(value, str) else f"<{type(value).__name__}>"
    if "://" in text:
        scheme, _, rest = text.partition("://")
        rest = rest.split("?", 1)[0].split("#", 1)[0]
        authority, slash, path = rest.partition("/")
        text = f"{scheme}://{authority.rsplit('@', 1)[-1]}{slash}{path}"
    if len(text) > MAX_SHOWN_CHARS:
        text = text[:MAX_SHOWN_CHARS] + "..."
    return repr(text)


class ObjectReferences:
    """Resolves a message's references for one storage: forms, default buckets, allow-list.

    ``models_bucket`` (S3_MODELS_BUCKET, may be None) holds bare LoRA keys, ``media_bucket``
    (AWS_STORAGE_BUCKET_NAME) bare signature keys. ``allowed_buckets`` (S3_ALLOWED_BUCKETS;
    None or empty: any bucket the credentials can read) limits the buckets a reference may
    name; the two default buckets are always allowed, so bare keys keep working.
    """

    def __init__(
        self,
        *,
        models_bucket: str | None,
        media_bucket: str,
        output_bucket: str,
        endpoint_url: str | None = None,
        public_base_url: str | None = None,
        allowed_buckets: Iterable[str] | None = None,
    ) -> None:
        self._defaults: dict[str, str | None] = {"lora": models_bucket, "signature": media_bucket}
        self._output_bucket = output_bucket
        self._endpoint_url = endpoint_url
        self._public_base_url = public_base_url
        allowed = frozenset(allowed_buckets or ())
        self._allowed = allowed | {media_bucket, *([models_bucket] if models_bucket else [])}
        self._restricted = bool(allowed)

    def resolve(self, ref: str, kind: ReferenceKind) -> ObjectLocation:
        """The bucket and key a message's ``ref`` names; ``InvalidRequest`` saying why it will
        not be read (its form, its bucket's name, the allow-list)."""
        where = self.locate(ref, self._defaults[kind])
        if self._restricted and where.bucket not in self._allowed:
            raise InvalidRequest(
                f"{_shown(ref)}: bucket {_shown(where.bucket)} is not in S3_ALLOWED_BUCKETS"
            )
        return where

    def locate(self, ref: str, default_bucket: str | None) -> ObjectLocation:
        """The bucket and key of ``ref``, a bare key being in ``default_bucket``; no allow-list
        (for the worker's own keys, such as outputs)."""
        bucket, key = parse_reference(
            ref,
            default_bucket=default_bucket,
            endpoint_url=self._endpoint_url,
            public_base_url=self._public_base_url,
            output_bucket=self._output_bucket,
        )
        return ObjectLocation(bucket=bucket, key=key)
