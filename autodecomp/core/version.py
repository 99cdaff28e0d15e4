"""The installed package's version: one source, the package metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("autodecomp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
