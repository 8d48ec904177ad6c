"""boto3 failures as domain errors, with messages that never name an endpoint or a credential.

botocore's connection errors put the endpoint URL in their text (``Could not connect to the
endpoint URL: "http://host:port/bucket/key"``); the messages built here name the object as
``s3://bucket/key`` and the failure by its kind only. Who is at fault decides the code: a
reference the storage refuses (a 4xx other than our own credentials failing) is the message's
fault, INVALID_REQUEST; our own buckets, credentials, a throttling or an outage are
STORAGE_ERROR, which is retried and never refunds the job.
"""

from __future__ import annotations

import re

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from domain.errors import GenerationError, InvalidRequest, StorageError

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
ACCESS_DENIED_CODES = frozenset({"403", "AccessDenied", "Forbidden", "AllAccessDisabled"})
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "AccountProblem",
        "InvalidSecurity",
    }
)
"""Answers that say the worker's own credentials or clock are wrong, whatever the bucket."""
TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestThrottled",
        "OperationAborted",
    }
)
"""4xx answers that pass with time (throttling, a timeout, a conflicting operation)."""
TRANSIENT_STATUSES = frozenset({408, 429})
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
CONFLICT_CODES = frozenset({"ConditionalRequestConflict"})
NOT_IMPLEMENTED_CODES = frozenset({"NotImplemented", "501"})

_UNREACHABLE = (
    (ConnectTimeoutError, "connection timed out"),
    (ReadTimeoutError, "read timed out"),
    (ProxyConnectionError, "cannot connect through the proxy"),
    (SSLError, "TLS handshake failed"),
    (EndpointConnectionError, "cannot connect"),
    (ConnectionClosedError, "connection closed"),
    (ResponseStreamingError, "connection broken while reading"),
    (NoCredentialsError, "no credentials found"),
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*")
_HOST_PORT = re.compile(r"\b[\w.-]+:\d{1,5}\b")
_KEYWORD_HOST_PORT = re.compile(r"\b(?:host|port|endpoint_url|proxy_url)=\S+")
_CODE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


def error_code(exc: ClientError) -> str:
    """The S3 error code of an answer (``NoSuchKey``, or the status for a bodiless HEAD)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return _CODE_CHARACTERS.sub("", code)[:64]


def http_status(exc: ClientError) -> int | None:
    """The HTTP status of an answer, if botocore recorded it."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def is_not_found(exc: ClientError) -> bool:
    """404, NoSuchKey, NoSuchBucket."""
    return error_code(exc) in NOT_FOUND_CODES or http_status(exc) == 404


def is_already_there(exc: ClientError) -> bool:
    """A conditional create refused: 412 PreconditionFailed, or 409 ConditionalRequestConflict
    (another write of the key was in progress)."""
    code = error_code(exc)
    return code in PRECONDITION_CODES or code in CONFLICT_CODES or http_status(exc) == 412


def is_not_implemented(exc: ClientError) -> bool:
    """501 NotImplemented: the server does not know a header it was sent."""
    return error_code(exc) in NOT_IMPLEMENTED_CODES or http_status(exc) == 501


def unreachable(exc: BotoCoreError) -> str:
    """What went wrong on the way to S3, without the endpoint URL botocore puts in the text."""
    for kind, phrase in _UNREACHABLE:
        if isinstance(exc, kind):
            return f"S3 unreachable ({phrase})"
    return f"S3 unreachable ({type(exc).__name__}: {scrubbed(str(exc))})"


def scrubbed(text: str) -> str:
    """``text`` without URLs or host:port pairs."""
    text = _URL.sub("<endpoint>", text)
    text = _KEYWORD_HOST_PORT.sub("<endpoint>", text)
    return _HOST_PORT.sub("<endpoint>", text)


def storage_error(exc: ClientError | BotoCoreError, what: str) -> StorageError:
    """A failure on a bucket of the worker's own configuration: always STORAGE_ERROR."""
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{what}: {unreachable(exc)}")
    code, status = error_code(exc), http_status(exc)
    if is_not_implemented(exc):
        return StorageError(f"{what}: the storage does not implement this request ({code})")
    if code in ACCESS_DENIED_CODES or code in CREDENTIAL_CODES or status == 403:
        return StorageError(f"{what}: access denied ({code})")
    return StorageError(f"{what}: S3 error {code} (HTTP {status})")


def reading_error(
    exc: ClientError | BotoCoreError,
    what: str,
    *,
    not_found: GenerationError,
    configured_bucket: bool,
) -> GenerationError:
    """A failure reading an object a message names.

    404: ``not_found``. 403 on a bucket the worker is configured with, a credential problem,
    throttling, 5xx, no answer: STORAGE_ERROR (our side; retried). 403 on any other bucket and
    every other 4xx: INVALID_REQUEST (the reference cannot be read, now or later).
    """
    if isinstance(exc, BotoCoreError):
        return storage_error(exc, what)
    code, status = error_code(exc), http_status(exc)
    if is_not_found(exc):
        return not_found
    if code in PRECONDITION_CODES or status == 412:
        # Only downloads send a condition (If-Match on the version just listed).
        return StorageError(f"{what}: changed while being downloaded ({code})")
    ours = (
        code in CREDENTIAL_CODES
        or code in TRANSIENT_CODES
        or status in TRANSIENT_STATUSES
        or status is None
        or not 400 <= status < 500
    )
    denied = code in ACCESS_DENIED_CODES or status == 403
    if ours or (denied and configured_bucket):
        return storage_error(exc, what)
    if denied:
        return InvalidRequest(f"{what}: access denied: the worker's credentials cannot read it")
    return InvalidRequest(f"{what}: the storage refused to read it ({code}, HTTP {status})")
