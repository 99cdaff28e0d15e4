"""The factor cache's weight keys: content hashes that follow in-place updates."""

import torch
from torch import nn

from autodecomp.factorize.cache import FactorCache, weight_key


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
