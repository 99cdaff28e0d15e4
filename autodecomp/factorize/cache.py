"""A cache of factorisations keyed by a hash of the dense weight.

SVD-family factorisations are stored once per layer and truncated for any rank; ALS results
are stored per (layer, rank). Entries live in memory (LRU) and, when a directory is set, on
disk as atomically renamed ``torch.save`` files, so worker processes of one study share
them safely: a reader never sees a half-written file, and a missing entry is computed under
a per-entry lock file, so processes that need it at once compute it once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write, exclusive_lock

__all__ = ["FactorCache", "default_cache", "weight_key"]


# id(tensor) -> (weak reference, (data_ptr, version), key); entries leave with their tensor.
_KEYS: dict[int, tuple[weakref.ref, tuple[int, int], str]] = {}


def weight_key(weight: torch.Tensor) -> str:
    """A content hash of a tensor (shape, dtype and values).

    Hashing a 512x512x3x3 kernel takes milliseconds, more than a warm rank change, so the
    hash is remembered per tensor object (a layer's ``weight`` parameter) together with its
    storage address and version counter: an in-place update or a new ``.data`` rehashes.
    """
    stamp = (weight.data_ptr(), weight._version)
    known = _KEYS.get(id(weight))
    if known is not None and known[0]() is weight and known[1] == stamp:
        return known[2]
    data = weight.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    key = digest.hexdigest()
    if known is None or known[0]() is not weight:
        weakref.finalize(weight, _KEYS.pop, id(weight), None)
    _KEYS[id(weight)] = (weakref.ref(weight), stamp, key)
    return key


class FactorCache:
    """LRU cache of factor tensors with an optional shared directory."""

    def __init__(self, max_entries: int = 256, directory: str | os.PathLike | None = None):
        self.max_entries = max_entries
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def set_directory(self, directory: str | os.PathLike | None) -> None:
        """Share entries through ``directory`` (created if missing); ``None`` turns it off."""
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        with self._lock:
            self._memory.clear()
            self.hits = self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return the entry for ``key``, computing and storing it on a miss."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self.hits += 1
                return self._memory[key]
        value = self._load(key)
        if value is None:
            with self._compute_lock(key):
                value = self._load(key)  # another process may have stored it meanwhile
                if value is None:
                    self.misses += 1
                    value = compute()
                    self._store(key, value)
                else:
                    self.hits += 1
        else:
            self.hits += 1
        with self._lock:
            self._memory[key] = value
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
        return value

    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        safe = hashlib.blake2b(key.encode(), digest_size=20).hexdigest()
        return self.directory / f"{safe}.pt"

    def _compute_lock(self, key: str) -> AbstractContextManager[None]:
        path = self._path(key)
        return nullcontext() if path is None else exclusive_lock(path.with_suffix(".lock"))

    def _load(self, key: str) -> Any:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt entry is recomputed, never trusted
            return None

    def _store(self, key: str, value: Any) -> None:
        path = self._path(key)
        if path is None:
            return
        atomic_write(path, lambda tmp: torch.save(value, tmp))


default_cache = FactorCache()
