"""What the backend's answers and the transport's errors mean: send again, maybe applied, refused.

The backend refunds on every ``failed`` call it applies, so a failure is sent again only when it
surely was not applied; a ``completed`` may be repeated harmlessly.
"""

from __future__ import annotations

import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import ProxyError as Urllib3ProxyError

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""Statuses whose ``Retry-After`` header is honoured."""
FAILURE_RETRY_STATUSES = frozenset({408, 429, 500, 503})
"""The only statuses a ``failed`` call is sent again after: the view did not apply it (a 500 from
the view means its transaction rolled back; 503, 429 and 408 are answered before it runs). Any
other 5xx (a gateway's 502 or 504: the view behind it may have committed) means the failure may
have been applied, and the backend refunds on every call."""
NOT_APPLIED_5XX = frozenset({500, 503})
"""Server errors after which the call was not applied; any other 5xx may hide an applied call."""
CREDENTIAL_STATUSES = frozenset({401, 403})
"""The backend's middleware answers these for a wrong token or ``X-Request-Source``."""

RETRIED_EXCEPTIONS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
"""Transport errors an outcome is sent again after (a failure only when nothing was sent)."""
_NEVER_SENT_EXCEPTIONS = (
    requests.ConnectTimeout,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.URLRequired,
)
"""Raised before any byte of the request left: a connect timeout, or a request never built."""


def retryable(status: int, *, failure: bool = False) -> bool:
    """Whether an outcome answered ``status`` is sent again (a failure only when not applied)."""
    if failure:
        return status in FAILURE_RETRY_STATUSES
    return status >= 500 or status in {408, 429}


def view_may_have_applied(status: int) -> bool:
    """A server error that may hide an applied call: a gateway's (502, 504...), not the view's
    own 500 (its transaction rolled back) nor a 503 (nothing ran)."""
    return status >= 500 and status not in NOT_APPLIED_5XX


def never_sent(exc: BaseException) -> bool:
    """Whether the request surely never reached the backend: a connect timeout, a connection
    refused (or a name not resolved: urllib3's ``NewConnectionError``, also behind a proxy), or a
    request that could not be built. Anything else may have been sent, and perhaps applied."""
    if isinstance(exc, _NEVER_SENT_EXCEPTIONS):
        return True
    if not isinstance(exc, requests.ConnectionError) or isinstance(
        exc, requests.exceptions.SSLError
    ):
        return False
    reason: object = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    if isinstance(reason, Urllib3ProxyError):
        reason = reason.original_error
    return isinstance(reason, NewConnectionError)


def answer_lost(exc: BaseException) -> bool:
    """Whether the request may have reached the backend before the failure (not a connect error)."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.ProxyError)):
        return False
    if isinstance(exc, (requests.ReadTimeout, requests.exceptions.ChunkedEncodingError)):
        return True
    text = str(exc)
    return "RemoteDisconnected" in text or "Connection aborted" in text


def credentials_hint(status: int) -> str:
    """What a 401/403 from the backend's middleware means, naming the settings to check."""
    if status == 401:
        return (
            "the backend refuses the worker's token: INTERNAL_API_TOKEN must equal the backend's"
            " (and WEBHOOK_SIGNING_SECRET its secret, when set)"
        )
    return (
        "the backend refuses the worker's request source (X-Request-Source) or"
        " INTERNAL_API_TOKEN's permissions"
    )


def describe(exc: BaseException) -> str:
    """An exception on one short line (requests' messages name the URL, never the headers)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
