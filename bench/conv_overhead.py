"""Where the time of a small conv goes: the whole call against the kernel's own work.

For the conv shapes of resnet20's decomposed layers (batch 1, one thread), print the median
time of one ``F.conv2d`` call, the ATen kernel it lands in (from ``torch.profiler``) and,
when that kernel is oneDNN's, oneDNN's own execution time (``ONEDNN_VERBOSE=1`` in a child
process). The gap is per-call overhead that no change of the decomposed layer's arithmetic
removes (docs/latency.md: "Why the small layers cannot meet it").

A second table, at a batch (``--batch``, default 32), times a 3x3 conv over resnet20's
first-stage 32x32 maps for a range of channel counts (``--widths``), in NCHW and in
channels-last memory, interleaved round by round: the floor one pass over the map costs
however few channels it has, which bounds a layer of three such passes.

    python bench/conv_overhead.py
    python bench/conv_overhead.py --calls 500 --batch 32 --widths 4 6 8 12 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

# name: (input shape, weight shape, groups, channels-last input)
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, bool]] = {
    "dense 16->16 3x3 32x32": ((1, 16, 32, 32), (16, 16, 3, 3), 1, False),
    "tucker core 6->6 3x3 32x32": ((1, 6, 32, 32), (6, 6, 3, 3), 1, False),
    "1x1 16->6 32x32": ((1, 16, 32, 32), (6, 16, 1, 1), 1, False),
    "depthwise 16 3x3 32x32 (channels-last)": ((1, 16, 32, 32), (16, 1, 3, 3), 16, True),
    "depthwise 64 3x3 8x8 (channels-last)": ((1, 64, 8, 8), (64, 1, 3, 3), 64, True),
}


def _call(name: str):
    shape, weight_shape, groups, channels_last = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(weight_shape)
    padding = weight_shape[-1] // 2
    return lambda: F.conv2d(x, weight, padding=padding, groups=groups)


def call_ms(name: str, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` timed calls (after 30 untimed ones)."""
    call = _call(name)
    times = []
    with torch.inference_mode():
        for _ in range(30):
            call()
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def kernel(name: str) -> str:
    """The ATen op with the most self time in one call."""
    call = _call(name)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        for _ in range(5):
            call()
    return max(prof.key_averages(), key=lambda event: event.self_cpu_time_total).key


def onednn_ms(name: str, calls: int) -> float | None:
    """Median oneDNN convolution execution time from a child run with ONEDNN_VERBOSE=1."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    command = [sys.executable, __file__, "--child", name, "--calls", str(calls)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    times = [
        float(line.rsplit(",", 1)[1])
        for line in out.splitlines()
        if line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line
    ]
    return statistics.median(times[-calls:]) if times else None


def width_sweep(batch: int, widths: list[int], rounds: int) -> dict[str, float]:
    """Median ms of a ``w -> w`` 3x3 conv on ``(batch, w, 32, 32)``, per width and layout."""
    calls = {}
    for width in widths:
        torch.manual_seed(0)
        x = torch.randn(batch, width, 32, 32)
        weight = torch.randn(width, width, 3, 3)
        for layout, data in (
            ("nchw", x),
            ("channels-last", x.contiguous(memory_format=torch.channels_last)),
        ):
            calls[f"{width}->{width} {layout}"] = partial(F.conv2d, data, weight, padding=1)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per conv")
    parser.add_argument("--batch", type=int, default=32, help="batch of the width sweep")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[4, 6, 8, 12, 16], help="channels swept"
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of the sweep")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        call_ms(args.child, args.calls)
        return
    print(f"batch 1, 1 thread, median of {args.calls} calls")
    print(f"{'conv':<42} {'call ms':>8} {'oneDNN ms':>10}  kernel")
    for name in CASES:
        call = statistics.median(call_ms(name, args.calls))
        inner = onednn_ms(name, args.calls)
        shown = "-" if inner is None else f"{inner:.4f}"
        print(f"{name:<42} {call:8.4f} {shown:>10}  {kernel(name)}")
    print(f"\nbatch {args.batch}, 3x3 conv on 32x32 maps, median of {args.rounds} rounds")
    print(f"{'conv':<42} {'ms':>8}")
    for name, ms in width_sweep(args.batch, args.widths, args.rounds).items():
        print(f"{name:<42} {ms:8.3f}")


if __name__ == "__main__":
    main()
