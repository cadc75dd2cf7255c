"""Where a GPU iteration of the loop goes: torch.profiler over BUARL self-training iterations
(`acdc` config, 256², batch 24), eager or compiled, validation and test evaluation left out.

    python bench/gpu_profile.py --acdc DATA [--compile reduce-overhead] [--iters 20]

Prints the unprofiled speed, the GPU's busy time and the host's time per iteration, and the
profiler's tables (by total host time and by self host time); writes them to
bench/results/gpu_profile_<card>_<compile>.txt.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.gpu import card_slug  # noqa: E402 (after the path: run as a script)
from bench.iterations import iterations_only  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acdc", help="ACDC data root (default: the phantom)")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"])
    p.add_argument("--iters", type=int, default=20, help="iterations timed, then as many profiled")
    p.add_argument("--warmup", type=int, default=30, help="iterations first (compilation, cuDNN's choices)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, help="the report file (default bench/results/gpu_profile_<card>_<compile>.txt)")
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    loop, run = iterations_only("acdc" if a.acdc else "phantom", {
        "data_root": a.acdc, "labeled": 3 if a.acdc else 2, "device": a.device, "compile": a.compile})
    cfg = loop.cfg
    sync = torch.cuda.synchronize if loop.device.type == "cuda" else (lambda: None)

    def steps(n: int) -> float:
        sync()
        began = time.perf_counter()
        run(n)
        sync()
        return time.perf_counter() - began

    warm = steps(a.warmup)
    timed = steps(a.iters)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loop.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = steps(a.iters)
    events = prof.key_averages()
    # kernels only (as the table's "Self CUDA time total"): CPU ops and annotations carry their
    # kernels' time too, and summing every row counts it twice
    from torch.autograd import DeviceType
    busy_us = sum(e.self_device_time_total for e in events
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    card = torch.cuda.get_device_name() if loop.device.type == "cuda" else "cpu"
    out = io.StringIO()
    print(f"# {card}, torch {torch.__version__}, compile={a.compile}, config {'acdc' if a.acdc else 'phantom'} "
          f"(batch {cfg.batch_size}), BUARL self-training\n"
          f"# warm-up {a.warmup} iterations: {warm:.1f} s (compilation included)\n"
          f"# unprofiled: {a.iters / timed:.1f} it/s ({1000 * timed / a.iters:.1f} ms per iteration)\n"
          f"# profiled: {1000 * profiled / a.iters:.1f} ms per iteration, GPU busy {busy_us / 1000 / a.iters:.1f} ms "
          f"per iteration ({100 * busy_us / 1e6 / profiled:.0f} %)", file=out)
    print(events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60), file=out)
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), file=out)
    text = out.getvalue()
    print(text)
    path = a.out or ROOT / "bench" / "results" / f"gpu_profile_{card_slug(card)}_{a.compile.replace('-', '_')}.txt"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
