"""G5 (issue 12): time the ACDC test-set evaluation (40 volumes, 3 classes; Dice, Jaccard,
95HD, ASD) three ways, side by side in one run, and check that all give identical numbers:

- previous: medpy's hd95 and asd, each computing its own surface distances on the whole
  volume, one case after another (BCP's test script does this);
- distance transform: medpy's surface distances, computed once for both metrics, in the
  objects' bounding box (the path before the k-d tree);
- current: `evaluate` (a k-d tree over the surface voxels, its searches on the process's
  threads), which also reports how its time splits between prediction and metrics: on a GPU
  the network's share shrinks, the metrics' share is host work that stays.

Then the surface distances alone on the same predictions, per method. Writes
bench/results/evaluation.json (or --out).

    python bench/evaluation.py --checkpoint RUN/best.pt --data-root ../shared/data/ACDC
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from medpy import metric
from medpy.metric.binary import __surface_distances as medpy_distances

from buarl.checkpoint import config_of, load_into, read
from buarl.data import load_benchmark
from buarl.config import BENCHMARK_CLASSES
from buarl.evaluate import METRICS, crop_to_objects, evaluate, surface_distances
from buarl.inference import predict
from buarl.nets import build
from buarl.engine import to_device

TARGET_S = 15.0  # issue 12, G5, on 2 CPU cores (BCP's own test script: 31 s)


def previous_case_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    if pred.any() and gt.any():
        return {"dice": metric.binary.dc(pred, gt), "jaccard": metric.binary.jc(pred, gt),
                "hd95": metric.binary.hd95(pred, gt), "asd": metric.binary.asd(pred, gt)}
    return dict.fromkeys(METRICS, 0.0)


def transform_case_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    if pred.any() and gt.any():
        pred, gt = crop_to_objects(pred, gt)
        ab, ba = medpy_distances(pred, gt, None, 1), medpy_distances(gt, pred, None, 1)
        return {"dice": metric.binary.dc(pred, gt), "jaccard": metric.binary.jc(pred, gt),
                "hd95": float(np.percentile(np.hstack((ab, ba)), 95)), "asd": float(ab.mean())}
    return dict.fromkeys(METRICS, 0.0)


def per_case(model, cases, cfg, device, names, fn) -> list[dict]:
    out = []
    for case in cases:
        pred = predict(model, case, cfg, device)
        out.append({n: fn(pred == c, case.label == c) for c, n in enumerate(names, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--image-size", type=int, default=256, help="slices zoomed to this size (the protocol's 256)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "evaluation.json"))
    a = p.parse_args()
    obj = read(Path(a.checkpoint))
    cfg = config_of(obj, Path(a.checkpoint)).model_copy(update={
        "data_root": str(Path(a.data_root).resolve()), "base": "supervised", "labeled": 1, "device": "cpu",
        "image_size": a.image_size})
    model = build(cfg.dataset, cfg.num_classes)
    load_into(model, obj["weights"], Path(a.checkpoint))
    device = torch.device("cpu")
    model = to_device(model, cfg, device, 2).eval()
    cases = load_benchmark(cfg).test
    names = BENCHMARK_CLASSES[cfg.dataset]
    threads = torch.get_num_threads()

    wall = {}
    start = time.perf_counter()
    previous = per_case(model, cases, cfg, device, names, previous_case_metrics)
    wall["previous"] = time.perf_counter() - start
    start = time.perf_counter()
    transform = per_case(model, cases, cfg, device, names, transform_case_metrics)
    wall["distance_transform"] = time.perf_counter() - start
    start = time.perf_counter()
    current = evaluate(model, cases, cfg, device)
    wall["current"] = time.perf_counter() - start
    identical = all(float(previous[i][n][m]) == float(transform[i][n][m]) == current["per_case"][i][n][m]
                    for i in range(len(cases)) for n in names for m in METRICS)

    # The distances alone, on the same predictions and boxes
    preds = [predict(model, case, cfg, device) for case in cases]
    pairs = [crop_to_objects(p == c, case.label == c) for p, case in zip(preds, cases)
             for c in range(1, len(names) + 1) if (p == c).any() and (case.label == c).any()]
    methods = {"distance_transform": lambda x, y: (medpy_distances(x, y, None, 1), medpy_distances(y, x, None, 1)),
               "kd_tree_1_thread": lambda x, y: surface_distances(x, y, 1),
               f"kd_tree_{threads}_threads": lambda x, y: surface_distances(x, y, threads)}
    distances, results = {}, {}
    for label, fn in methods.items():
        start = time.perf_counter()
        results[label] = [fn(x, y) for x, y in pairs]
        distances[label] = round(time.perf_counter() - start, 3)
    same = all(all(np.array_equal(r, q) for r, q in zip(sum(results[k], ()), sum(results["distance_transform"], ())))
               for k in methods)
    # what the metrics no longer import: medpy on top of what evaluate already loads
    probe = ("import time, numpy, scipy.ndimage, scipy.spatial, torch; t = time.perf_counter(); "
             "import medpy.metric; print(time.perf_counter() - t)")
    medpy_import_s = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                          check=True).stdout)
    out = {"command": "python bench/evaluation.py --checkpoint RUN/best.pt --data-root ../shared/data/ACDC",
           "checkpoint": {key: obj["config"].get(key) for key in ("base", "labeled", "image_size", "pretrain_iters", "iters")} | {
                          "test_dice_at_this_size": round(current["dice"], 4)},
           "cases": len(cases), "image_size": cfg.image_size, "precision": cfg.precision,
           "threads": threads, "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
           "wall_s": {k: round(v, 2) for k, v in wall.items()},
           "current_split_s": current["seconds"],
           "speedup_over_previous": round(wall["previous"] / wall["current"], 2),
           "distances_s": distances, "structures_timed": len(pairs),
           "surface_voxels": int(sum(len(r) for r in sum(results["distance_transform"], ()))),
           "box_voxels": int(sum(x.size for x, _ in pairs)),
           "identical_per_case": identical, "identical_distances": same,
           "medpy_import_s": round(medpy_import_s, 2),
           "target_s": TARGET_S, "met": bool(wall["current"] <= TARGET_S and identical and same)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
