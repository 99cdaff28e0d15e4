"""The errors a user can be shown: each message is one line naming the bad value."""

from __future__ import annotations

__all__ = ["ConfigError", "DecompositionError", "UnsupportedLayerError"]


class ConfigError(ValueError):
    """An invalid study or search-space configuration (the message is one line)."""


class UnsupportedLayerError(ValueError):
    """A method cannot represent this layer (grouped conv, prime channel counts, ...)."""


class DecompositionError(RuntimeError):
    """A numerical factorisation failed (NaN, divergence, degenerate factors)."""
