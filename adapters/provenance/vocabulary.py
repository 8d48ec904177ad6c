"""The words every provenance mark shares: what made the image and what kind of image it is."""

from __future__ import annotations

from importlib import metadata as package_metadata

SOFTWARE_NAME = "stylelicense-worker"
"""The worker as the marks name it (the C2PA software agent, the XMP creator tool, A1111's
``Version``), and its installed distribution's name."""
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
"""IPTC digital source type of media created by a generative model from a prompt."""


def worker_version() -> str:
    """This worker's version, as installed."""
    try:
        return package_metadata.version(SOFTWARE_NAME)
    except package_metadata.PackageNotFoundError:
        return "0+unknown"
