"""G5 (issue 12): time the ACDC test-set evaluation (40 volumes, 3 classes; Dice, Jaccard,
95HD, ASD) the previous way (medpy's hd95 and asd each computing surface distances, one case
after another) and the current way (`evaluate`: prediction-to-truth distances shared by
hd95 and asd; on a GPU machine also computed in processes beside the next prediction, timed
here with 2), side by side in one run, and check that both give identical numbers; then the surface
distances alone on the same predictions, on the whole volume and in the objects' bounding box.
Writes bench/results/evaluation.json.

    python bench/evaluation.py --checkpoint RUN/best.pt --data-root ../shared/data/ACDC
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from medpy import metric

from buarl.checkpoint import config_of, load_into, read
from buarl.data import load_benchmark
import buarl.evaluate as evaluate_module
from buarl.evaluate import CLASS_NAMES, METRICS, case_metrics, evaluate
from buarl.inference import predict
from buarl.nets import build
from buarl.runtime import to_device

TARGET_S = 15.0  # issue 12, G5, on 2 CPU cores (BCP's own test script: 31 s)


def previous_case_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    if pred.any() and gt.any():
        return {"dice": metric.binary.dc(pred, gt), "jaccard": metric.binary.jc(pred, gt),
                "hd95": metric.binary.hd95(pred, gt), "asd": metric.binary.asd(pred, gt)}
    return dict.fromkeys(METRICS, 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--image-size", type=int, default=256, help="slices zoomed to this size (the protocol's 256)")
    p.add_argument("--context", default="forkserver", choices=["fork", "forkserver", "spawn"])
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
    names = CLASS_NAMES[cfg.dataset]

    start = time.perf_counter()
    previous = []
    for case in cases:
        pred = predict(model, case, cfg, device)
        previous.append({n: previous_case_metrics(pred == c, case.label == c) for c, n in enumerate(names, 1)})
    previous_s = time.perf_counter() - start

    timings = {}
    for workers in (1, 2):  # the CPU default, and distances in a process beside the prediction
        start = time.perf_counter()
        current = evaluate(model, cases, cfg, device, workers=workers, context=a.context)
        timings[workers] = time.perf_counter() - start
    # The distances alone, on the same predictions: the whole volume (the box switched off)
    # against the objects' bounding box (evaluate's path)
    preds = [predict(model, case, cfg, device) for case in cases]
    pairs = [(p == c, case.label == c) for p, case in zip(preds, cases) for c in range(1, len(names) + 1)]
    distances, box = {}, evaluate_module.crop_to_objects
    for label, crop in (("whole_volume", lambda *m: m), ("bounding_box", box)):
        evaluate_module.crop_to_objects = crop  # case_metrics looks it up at each call
        start = time.perf_counter()
        rows = [case_metrics(p, g) for p, g in pairs]
        distances[label] = (time.perf_counter() - start, rows)
    identical = distances["whole_volume"][1] == distances["bounding_box"][1] and all(float(previous[i][n][m]) == current["per_case"][i][n][m]
                    for i in range(len(cases)) for n in names for m in METRICS)
    out = {"command": "python bench/evaluation.py --checkpoint RUN/best.pt --data-root ../shared/data/ACDC",
           "cases": len(cases), "image_size": cfg.image_size, "precision": cfg.precision,
           "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
           "torch": torch.__version__,
           "previous_s": round(previous_s, 2),
           **{f"current_s_{w}_process{'es' if w > 1 else ''}": round(t, 2) for w, t in timings.items()},
           "speedup": round(previous_s / timings[1], 2),
           "distances_s_whole_volume": round(distances["whole_volume"][0], 2),
           "distances_s_bounding_box": round(distances["bounding_box"][0], 2),
           "structures_timed": len(pairs), "identical_per_case": identical,
           "target_s": TARGET_S, "met": bool(timings[1] <= TARGET_S and identical)}
    path = Path(__file__).resolve().parent / "results" / "evaluation.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
