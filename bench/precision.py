"""Measured ratios behind `precision: auto`: student forward+backward of the protocol
networks, fp32 vs bf16 autocast + channels_last, 2-D (UNet, `acdc_cpu` shape) and 3-D
(VNet, `la_cpu` shape), on this machine's CPU. Writes bench/results/precision_native_bf16.json or precision_no_native_bf16.json.

    python bench/precision.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from buarl.nets import UNet, VNet
from buarl.engine import cpu_has_fast_bf16

SHAPES = {"2d": (UNet, (16, 1, 128, 128)),     # acdc_cpu: batch 16 at 128^2
          "3d": (VNet, (8, 1, 64, 64, 48))}    # la_cpu: batch 8, patch 64x64x48


def step_seconds(net, shape: tuple[int, ...], bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if bf16 else torch.contiguous_format
    model = net().to(memory_format=fmt)
    x = torch.randn(shape).contiguous(memory_format=fmt)
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
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    out = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "native_bf16": cpu_has_fast_bf16(), "processor": platform.processor() or platform.machine(),
           "torch": torch.__version__, "command": "python bench/precision.py", "results": {}}
    for name, (net, shape) in SHAPES.items():
        fp32 = step_seconds(net, shape, False, a.repeats)
        bf16 = step_seconds(net, shape, True, a.repeats)
        out["results"][name] = {"net": net.__name__, "input": list(shape), "fp32_s": round(fp32, 3),
                                "bf16_channels_last_s": round(bf16, 3), "bf16_over_fp32": round(bf16 / fp32, 2)}
        print(name, out["results"][name], flush=True)
    tag = "native_bf16" if out["native_bf16"] else "no_native_bf16"
    path = Path(__file__).resolve().parent / "results" / f"precision_{tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
