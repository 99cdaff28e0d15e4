"""Numerical factorisations shared by the decomposition methods."""

from .cache import FactorCache, default_cache, weight_key

__all__ = ["FactorCache", "default_cache", "weight_key"]
