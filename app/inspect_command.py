"""``python -m app inspect FILE_OR_URL``: what a PNG or JPEG proves about its origin.

Exit status 0 when its content credentials validate (``--require-trusted``: and their signer is
trusted), 1 when it carries none or they fail (tampered, invalid, untrusted where trust is
required), 2 when the file cannot be read.

``python -m app health`` imports this module to build the parser, so the reading code (requests,
the C2PA SDK, numpy) is imported inside the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

EXIT_VERIFIED = 0
EXIT_NOT_VERIFIED = 1
EXIT_UNREADABLE = 2
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
"""A URL whose body is larger than this is not inspected."""


class SourceUnreadable(Exception):
    """The file or URL could not be read."""


def read_source(source: str, *, timeout: float = 60.0) -> bytes:
    """The bytes of a local path, a ``file:`` URL or an ``http(s)`` URL (at most
    ``MAX_DOWNLOAD_BYTES``, within ``timeout`` seconds in all, at most 5 redirects)."""
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return _download(source, timeout)
    path = Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceUnreadable(f"{path}: {exc.strerror or exc}") from exc


def _download(url: str, timeout: float) -> bytes:
    import requests  # pylint: disable=import-outside-toplevel
    import urllib3  # pylint: disable=import-outside-toplevel

    deadline = time.monotonic() + timeout
    try:
        with requests.Session() as session:
            session.max_redirects = 5
            with session.get(url, timeout=min(timeout, 30.0), stream=True) as response:
                response.raise_for_status()
                body = bytearray()
                # read1: whatever one receive brings, so a trickling server meets the deadline
                # (iter_content would wait for each 64 KiB).
                while chunk := response.raw.read1(64 * 1024, decode_content=True):
                    body.extend(chunk)
                    if len(body) > MAX_DOWNLOAD_BYTES:
                        raise SourceUnreadable(f"{url}: larger than {MAX_DOWNLOAD_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise SourceUnreadable(f"{url}: not downloaded within {timeout:g} s")
                return bytes(body)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise SourceUnreadable(f"{url}: {exc}") from exc


def run_inspect(_settings: Any, args: argparse.Namespace) -> int:
    """Read, inspect, print (text or ``--json``); the exit status as the module says."""
    # pylint: disable=import-outside-toplevel
    from adapters.provenance.credentials import CredentialsConfigError
    from adapters.provenance.inspection import NotAnImage, describe, inspect_image
    from adapters.provenance.invisible_mark import InvisibleMark

    try:
        anchors = read_source(args.trust_anchors) if args.trust_anchors else None
        data = read_source(args.source)
        inspection = inspect_image(
            data,
            invisible_mark=None if args.no_invisible_mark else InvisibleMark(),
            trust_anchors_pem=anchors,
        )
    except (SourceUnreadable, NotAnImage, CredentialsConfigError) as exc:
        print(f"inspect: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    verified = inspection.verified(require_trusted=args.require_trusted)
    if args.json:
        report = {"source": args.source, "verified": verified, **inspection.as_dict()}
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(f"source: {args.source}")
        for line in describe(inspection):
            print(line)
        print("verified: yes" if verified else "verified: no")
    return EXIT_VERIFIED if verified else EXIT_NOT_VERIFIED


def add_inspect(commands: Any) -> None:
    """The ``inspect`` sub-command and its arguments."""
    inspect = commands.add_parser(
        "inspect",
        help="what a PNG or JPEG proves: content credentials, metadata, the invisible mark",
    )
    inspect.add_argument("source", metavar="FILE_OR_URL")
    inspect.add_argument("--json", action="store_true", help="one JSON object, for machines")
    inspect.add_argument(
        "--require-trusted",
        action="store_true",
        help="exit 1 unless the signer is trusted (the development certificate is not)",
    )
    inspect.add_argument(
        "--trust-anchors",
        metavar="PEM",
        help="root certificates (PEM file) a signer is trusted under, e.g. the C2PA trust list",
    )
    inspect.add_argument(
        "--no-invisible-mark", action="store_true", help="do not look for the invisible mark"
    )
    inspect.set_defaults(handler=run_inspect, bad_settings_status=EXIT_UNREADABLE)
