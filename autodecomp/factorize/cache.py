"""A cache of factorisations keyed by a hash of the dense weight.

SVD-family factorisations are stored once per layer and truncated for any rank; ALS results
are stored per (layer, rank). Entries live in memory (least recently used first out once
their tensors pass ``max_bytes``, 1 GiB by default) and, when a directory is set, on
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

__all__ = ["DEFAULT_MAX_BYTES", "FactorCache", "default_cache", "entry_bytes", "weight_key"]

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: every SVD of a ResNet-50 several times over
_OVERHEAD = 64  # bytes counted per non-tensor leaf (ints, shapes) so no entry is free


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


def entry_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested tuples, lists and dicts), plus a little per
    other leaf."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(entry_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(entry_bytes(v) for v in value.values())
    return _OVERHEAD


def _checked_bytes(max_bytes: Any) -> int:
    if not (isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes >= 0):
        raise ValueError(f"factor cache max_bytes must be an int >= 0, got {max_bytes!r}")
    return max_bytes


class FactorCache:
    """Cache of factor tensors sized in bytes (least recently used out first), with an
    optional shared directory.

    Args:
        max_bytes: memory the entries' tensors may take; an entry larger than this is
            returned but not kept. 0 keeps nothing in memory.
        directory: see :meth:`set_directory`.
    """

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, directory: str | os.PathLike | None = None
    ):
        self.max_bytes = _checked_bytes(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0  # held in memory now
        self.hits = 0
        self.misses = 0

    def resize(self, max_bytes: int) -> None:
        """Change the memory limit, evicting the least recently used entries beyond it."""
        with self._lock:
            self.max_bytes = _checked_bytes(max_bytes)
            self._evict()

    def __len__(self) -> int:
        return len(self._memory)

    def set_directory(self, directory: str | os.PathLike | None) -> None:
        """Share entries through ``directory`` (created if missing); ``None`` turns it off."""
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        with self._lock:
            self._memory.clear()
            self.bytes = self.hits = self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return the entry for ``key``, computing and storing it on a miss."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                self.hits += 1
                return self._memory[key][0]
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
        nbytes = entry_bytes(value)
        with self._lock:
            if key in self._memory:  # stored by another thread meanwhile
                self.bytes -= self._memory.pop(key)[1]
            if nbytes <= self.max_bytes:
                self._memory[key] = (value, nbytes)
                self.bytes += nbytes
                self._evict()
        return value

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            _, (_, nbytes) = self._memory.popitem(last=False)
            self.bytes -= nbytes

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
            # onto the default device: decompose_conv makes it the conv's (surgery.on_device)
            return torch.load(path, map_location=torch.get_default_device(), weights_only=True)
        except Exception:  # a corrupt entry is recomputed, never trusted
            return None

    def _store(self, key: str, value: Any) -> None:
        path = self._path(key)
        if path is None:
            return
        atomic_write(path, lambda tmp: torch.save(value, tmp))


default_cache = FactorCache()
