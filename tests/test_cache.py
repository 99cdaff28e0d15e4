"""The factor cache: weight keys (content hashes that follow in-place updates), sharing
through a directory, its byte limit and whole-network rebuilds."""

import pytest
import torch
from torch import nn

import autodecomp as ad
from autodecomp.factorize.cache import FactorCache, weight_key
from autodecomp.workload.models import get_model


def test_weight_key_is_content_based_and_follows_updates():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3)
    first = weight_key(conv.weight)
    assert weight_key(conv.weight) == first
    assert weight_key(conv.weight.detach().clone()) == first  # same content, other tensor
    with torch.no_grad():
        conv.weight.mul_(2)  # in place: the version counter moves
    second = weight_key(conv.weight)
    assert second != first
    conv.weight.data = torch.ones_like(conv.weight)  # new storage under the same parameter
    assert weight_key(conv.weight) not in (first, second)
    assert weight_key(conv.weight) == weight_key(torch.ones(8, 8, 3, 3))
    assert weight_key(torch.ones(8, 8, 3, 3)) != weight_key(torch.ones(8, 8, 3, 3).double())


def test_cache_computes_once_and_shares_through_a_directory(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"u": torch.arange(4.0)}

    one, two = FactorCache(directory=tmp_path), FactorCache(directory=tmp_path)
    assert torch.equal(one.get_or_compute("k", compute)["u"], torch.arange(4.0))
    assert torch.equal(two.get_or_compute("k", compute)["u"], torch.arange(4.0))
    assert len(calls) == 1 and (one.misses, two.hits) == (1, 1)


def test_byte_limit_evicts_least_recently_used_first():
    cache = FactorCache(max_bytes=3 * 400)  # three 100-float32 entries
    for key in "abc":
        cache.get_or_compute(key, lambda: torch.zeros(100))
    assert (len(cache), cache.bytes) == (3, 1200)
    cache.get_or_compute("a", lambda: torch.ones(100))  # hit: "a" becomes the most recent
    cache.get_or_compute("d", lambda: torch.zeros(50, dtype=torch.float64))  # 400 bytes
    assert list(cache._memory) == ["c", "a", "d"] and cache.bytes == 1200  # "b" left
    cache.get_or_compute("e", lambda: (torch.zeros(84), 7))  # 336 bytes + 64 for the int
    assert list(cache._memory) == ["a", "d", "e"] and cache.bytes == 1200
    cache.get_or_compute("huge", lambda: torch.zeros(1000))  # larger than the limit: not kept
    assert list(cache._memory) == ["a", "d", "e"]
    cache.resize(500)
    assert list(cache._memory) == ["e"] and cache.bytes == 400
    assert (cache.hits, cache.misses) == (1, 6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_bad_byte_limit_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match=r"^factor cache max_bytes must be an int >= 0, got "):
        FactorCache(max_bytes=bad)


@pytest.mark.parametrize("method", ["sekron", "gkpd", "tt"])
def test_a_whole_network_rebuild_is_all_cache_hits(method):
    torch.manual_seed(0)
    model = get_model("resnet20")
    convs = [model.get_submodule(name) for name in ad.conv_layers(model)]
    cache = FactorCache()
    for build in range(2):
        misses = cache.misses
        for conv in convs:
            ad.decompose_conv(conv, method, ratio=0.25, cache=cache)
        assert (cache.misses - misses > 0) == (build == 0)
