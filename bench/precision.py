"""Measured ratio behind `precision: auto`: UNet forward+backward, fp32 vs bf16 autocast +
channels_last, on this machine's CPU. Writes bench/results/precision.json.

    python bench/precision.py [--size 128] [--batch 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from buarl.nets.unet import UNet
from buarl.runtime import cpu_has_fast_bf16


def step_seconds(bf16: bool, size: int, batch: int, repeats: int) -> float:
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    model = UNet().to(memory_format=fmt)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
    times = []
    for i in range(repeats + 1):  # the first step warms up oneDNN and is not counted
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().mean()
        loss.backward()
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    fp32 = step_seconds(False, a.size, a.batch, a.repeats)
    bf16 = step_seconds(True, a.size, a.batch, a.repeats)
    out = {"size": a.size, "batch": a.batch, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_fast_bf16(),
           "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
           "fp32_s": round(fp32, 3), "bf16_channels_last_s": round(bf16, 3),
           "bf16_over_fp32": round(bf16 / fp32, 2)}
    path = Path(__file__).resolve().parent / "results" / "precision.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
