"""Where the time of a small conv goes: the whole call against the kernel's own work.

For the conv shapes of resnet20's decomposed layers (batch 1, one thread), print the median
time of one ``F.conv2d`` call, the ATen kernel it lands in (from ``torch.profiler``) and,
when that kernel is oneDNN's, oneDNN's own execution time (``ONEDNN_VERBOSE=1`` in a child
process). The gap is per-call overhead that no change of the decomposed layer's arithmetic
removes (README: "Why the small layers cannot meet it").

    python bench/conv_overhead.py
    python bench/conv_overhead.py --calls 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per conv")
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


if __name__ == "__main__":
    main()
