"""Cost counting: the only module that talks to fvcore.

MACs follow fvcore's convention (one multiply-add = 1) and include every op fvcore counts
(convolutions, linear layers, matmuls, batch norm, pooling).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["count_macs", "count_params", "macs_by_module", "uncounted_ops"]

# Ops that move or select data but do no multiply-adds; fvcore may list them as unsupported.
_NON_ARITHMETIC = {
    "aten::pad",
    "aten::constant_pad_nd",
    "aten::view",
    "aten::reshape",
    "aten::permute",
    "aten::contiguous",
    "aten::slice",
    "aten::select",
    "aten::cat",
    "aten::stack",
    "aten::roll",
    "aten::zeros",
    "aten::zeros_like",
    "aten::new_zeros",
    "aten::unflatten",
    "aten::flatten",
    "aten::expand",
    "aten::index",
    "aten::index_select",
    "aten::narrow",
}


def _example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def _analysis(model: nn.Module, input_shape: Sequence[int]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    example = _example_input(model, input_shape)
    analysis = FlopCountAnalysis(model, example)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def _run(model: nn.Module, input_shape: Sequence[int], what):
    was_training = model.training
    model.eval()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return what(_analysis(model, input_shape))
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Total multiply-adds of one forward pass, counted by fvcore.

    Args:
        model: any module; it is traced in eval mode and left in its original mode.
        input_shape: ``(C, H, W)`` (batch 1) or ``(N, C, H, W)``.
    """
    return int(_run(model, input_shape, lambda a: a.total()))


def macs_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """fvcore's MAC count per submodule name ("" is the whole model)."""
    return {k: int(v) for k, v in _run(model, input_shape, lambda a: a.by_module()).items()}


def uncounted_ops(model: nn.Module, input_shape: Sequence[int]) -> Counter:
    """Ops fvcore skipped that may do arithmetic (pure data movement is filtered out)."""
    ops = _run(model, input_shape, lambda a: (a.total(), a.unsupported_ops())[1])
    return Counter({op: n for op, n in ops.items() if op not in _NON_ARITHMETIC})


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
