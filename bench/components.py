"""G1 (issue 12): how many sweeps the device clean-up of the pseudo-labels (the largest
connected component per class, `buarl.fast.components`) needs to reach its fixed point, with
ids spread one voxel per sweep (the sweep before hooking, kept here as the reference) and
with hooking (the current sweep), on label maps of the protocol's shapes:

- ACDC label maps: the benchmark's own labels of random training slices, augmented as the
  loop does, 256x256, the `acdc` config's 12 unlabeled images (a trained teacher's
  pseudo-labels look like these);
- blobs: smooth random label maps of the same shape, several components per class with
  holes and long borders (an early teacher's pseudo-labels look more like these);
- LA label maps (with --la): the labels of random 112x112x80 training crops, batch 2.

Each fixed-point test is a host sync on a GPU and each call of SWEEPS_PER_CHECK sweeps a
compiled graph's call, so the calls per batch are what the host pays; both ways must find
the same components (checked against scipy). The CPU time of the eager fixed point is
reported too (one sweep's cost grows with hooking's scatter and gather). Writes
bench/results/components.json (or --out).

    python bench/components.py --acdc ../shared/data/ACDC --la ../shared/data/LA
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from buarl.config import load_config
from buarl.data import load_benchmark
from buarl.fast import components
from buarl.method import pseudo


def spread_only(ids, inside, fg, connectivity):
    """The sweep before hooking: each id the minimum over its neighbours, then one jump."""
    new = torch.where(inside, components._min_neighbour(ids, connectivity), float("inf")).flatten()
    return torch.where(fg, new[torch.where(fg, new, 0).long()], new).reshape(ids.shape)


def sweeps_to_fixed_point(masks: torch.Tensor, sweep, connectivity: str) -> tuple[int, torch.Tensor, float]:
    """Sweeps until one changes nothing (that one counted), the ids, and the CPU seconds."""
    index = torch.arange(masks.numel(), dtype=torch.float32).reshape(masks.shape)
    ids = torch.where(masks, index, float("inf"))[:, None]
    inside, fg = masks[:, None], masks.flatten()
    started, n = time.perf_counter(), 0
    while True:
        new, n = sweep(ids, inside, fg, connectivity), n + 1
        if torch.equal(new, ids):
            return n, new, time.perf_counter() - started
        ids = new


def label_batches(root: str, config: str, n: int, batches: int, seed: int) -> list[torch.Tensor]:
    cfg = load_config(config, {"data_root": root, "labeled": 1, "seed": seed})
    data = load_benchmark(cfg)
    gen = torch.Generator().manual_seed(seed)
    pool = list(data.labeled_idx) + list(data.unlabeled_idx)  # the arrays hold every slice's label
    out = []
    for _ in range(batches):
        idx = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:n].tolist()]
        out.append(data.batch(idx, gen)[1])
    return out


def blob_batches(shape: tuple, batches: int, seed: int, sigma: float = 4) -> list[torch.Tensor]:
    """Smooth random label maps (classes 0-3): blobs of several components per class, with
    holes and long borders."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        noise = rng.standard_normal(shape)
        smooth = np.stack([ndimage.gaussian_filter(a, sigma) for a in noise])
        out.append(torch.from_numpy(np.digitize(smooth / smooth.std(), [0.3, 0.8, 1.3])))
    return out


def measure(name: str, batches: list[torch.Tensor], classes: int, connectivity: str) -> dict:
    rows = []
    for labels in batches:
        masks = torch.stack([labels == c for c in range(1, classes)], 1).flatten(0, 1)
        want = pseudo.largest_components(masks.numpy(), connectivity)
        row = {}
        for way, sweep in (("spread", spread_only), ("hooked", components._sweep)):
            n, ids, seconds = sweeps_to_fixed_point(masks, sweep, connectivity)
            kept = components._keep_largest(ids[:, 0], masks).numpy()
            assert np.array_equal(kept, want), (name, way)
            row[way] = {"sweeps": n, "calls": math.ceil(n / components.SWEEPS_PER_CHECK) + 1, "cpu_s": seconds}
        rows.append(row)
    summary = {"masks": f"{len(batches)} batches of {tuple(masks.shape)} ({connectivity} connectivity)"}
    for way in ("spread", "hooked"):
        sweeps = [r[way]["sweeps"] for r in rows]
        calls = [r[way]["calls"] for r in rows]
        summary[way] = {"sweeps_mean": float(np.mean(sweeps)), "sweeps_max": int(max(sweeps)),
                        "calls_mean": float(np.mean(calls)),
                        "cpu_s_per_sweep": float(np.sum([r[way]["cpu_s"] for r in rows]) / np.sum(sweeps))}
    summary["calls_ratio"] = summary["spread"]["calls_mean"] / summary["hooked"]["calls_mean"]
    print(f"{name:>5}: sweeps {summary['spread']['sweeps_mean']:.1f} -> {summary['hooked']['sweeps_mean']:.1f} "
          f"(max {summary['spread']['sweeps_max']} -> {summary['hooked']['sweeps_max']}), calls of "
          f"{components.SWEEPS_PER_CHECK} {summary['spread']['calls_mean']:.2f} -> {summary['hooked']['calls_mean']:.2f}, "
          f"CPU ms per sweep {1e3 * summary['spread']['cpu_s_per_sweep']:.1f} -> "
          f"{1e3 * summary['hooked']['cpu_s_per_sweep']:.1f}", flush=True)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acdc", help="the ACDC data root (the SSL4MIS layout)")
    p.add_argument("--la", help="the LA data root (the UA-MT layout)")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "components.json"))
    args = p.parse_args()
    results = {"sweeps_per_check": components.SWEEPS_PER_CHECK, "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "command": "python bench/components.py" + (f" --acdc {args.acdc}" if args.acdc else "")
               + (f" --la {args.la}" if args.la else "") + f" --batches {args.batches} --seed {args.seed}"}
    if args.acdc:
        results["acdc_labels"] = measure("acdc", label_batches(args.acdc, "acdc", 12, args.batches, args.seed), 4, "full")
    results["blobs"] = measure("blobs", blob_batches((12, 256, 256), args.batches, args.seed), 4, "full")
    if args.la:
        results["la_labels"] = measure("la", label_batches(args.la, "la", 2, args.batches, args.seed), 2, "full")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
