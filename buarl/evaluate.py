"""The reference evaluation protocols' metrics (medpy dc, jc, hd95, asd) on the volume
predictions of `buarl.inference`: per class 1..3, mean over volumes, then over classes.
Empty predictions never crash: the reference policy scores a missed class (0, 0, 0, 0)
as BCP does, the strict policy gives it the image diagonal as distance; both count it.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

import numpy as np
import torch
from torch import nn

from buarl.config import Config
from buarl.data.types import Case
from buarl.inference import predict

CLASS_NAMES = {"acdc": ["RV", "Myo", "LV"], "la": ["LA"]}
METRICS = ("dice", "jaccard", "hd95", "asd")


def crop_to_objects(*masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """The masks cut to the bounding box of their union. No metric changes: counts do not,
    every surface voxel (so every nearest-surface distance) lies inside the box, and a voxel
    on the box's face erodes alike in both (its outer neighbour is background in the volume
    and beyond the edge, which erosion counts as background, in the crop). The distance
    transform then covers the heart, not the whole scan (timed in bench/evaluation.py)."""
    union = np.logical_or.reduce(masks)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    return tuple(m[box] for m in masks)


def case_metrics(pred: np.ndarray, gt: np.ndarray, policy: str = "reference") -> tuple[dict, bool]:
    """Metrics of one binary prediction against one binary ground truth.

    Returns (metrics, empty) where `empty` flags a prediction that missed a present class.
    """
    # medpy here, not at the top: it imports scipy.stats (over a second), and a sweep's
    # driver imports this module through the trial's but never evaluates
    from medpy import metric
    from medpy.metric.binary import __surface_distances as surface_distances  # noqa: the one helper hd95 and asd share
    pred, gt = pred.astype(bool), gt.astype(bool)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if has_p and has_g:
        pred, gt = crop_to_objects(pred, gt)
        # medpy's hd95 and asd, computing the prediction-to-truth distances once for both
        # (identical values: tests/test_evaluation.py)
        pred_to_gt, gt_to_pred = surface_distances(pred, gt, None, 1), surface_distances(gt, pred, None, 1)
        return {"dice": metric.binary.dc(pred, gt), "jaccard": metric.binary.jc(pred, gt),
                "hd95": float(np.percentile(np.hstack((pred_to_gt, gt_to_pred)), 95)),
                "asd": float(pred_to_gt.mean())}, False
    empty = has_g and not has_p
    if policy == "reference":
        return dict.fromkeys(METRICS, 0.0), empty
    if not has_p and not has_g:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}, False
    diagonal = float(math.sqrt(sum(s * s for s in gt.shape)))
    return {"dice": 0.0, "jaccard": 0.0, "hd95": diagonal, "asd": diagonal}, empty


def dice_only(pred: np.ndarray, gt: np.ndarray) -> float:
    """Fast Dice for validation (same value as medpy's dc; 0 when both are empty)."""
    inter = np.count_nonzero(pred & gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 2.0 * inter / total if total else 0.0


def validation_scores(model: nn.Module, cases: Iterable[Case], cfg: Config, device: torch.device) -> dict:
    """Mean foreground Dice over cases and classes (model selection; no distances), and the
    fraction of val voxels predicted / labeled foreground (a collapse to background shows)."""
    was = model.training
    model.eval()
    scores, fg_pred, fg_true, voxels = [], 0, 0, 0
    for case in cases:
        pred = predict(model, case, cfg, device)
        scores.append([dice_only(pred == c, case.label == c) for c in range(1, cfg.num_classes)])
        fg_pred += np.count_nonzero(pred)
        fg_true += np.count_nonzero(case.label)
        voxels += pred.size
    model.train(was)
    nan = float("nan")
    return {"dice": float(np.mean(scores)) if scores else nan,
            "fg_pred": fg_pred / voxels if voxels else nan, "fg_true": fg_true / voxels if voxels else nan}



def _case_row(name: str, pred: np.ndarray, label: np.ndarray, classes: list[str], policy: str) -> tuple[dict, int, int]:
    row: dict = {"case": name}
    empty = structures = 0
    for c, cls in enumerate(classes, start=1):
        m, e = case_metrics(pred == c, label == c, policy)
        empty += int(e)
        structures += int((label == c).any())
        row[cls] = {k: float(v) for k, v in m.items()}
    return row, empty, structures


def metric_workers(device: torch.device) -> int:
    """Processes for the surface distances. On a GPU the host cores are idle while the
    network predicts, so each case's distances run beside the next prediction; on a CPU the
    network already uses the cores and extra processes only contend (bench/evaluation.py)."""
    return min(os.cpu_count() or 1, 8) if device.type == "cuda" else 1


def evaluate(model: nn.Module, cases: list[Case], cfg: Config, device: torch.device,
             policy: str | None = None, workers: int | None = None, context: str = "forkserver") -> dict:
    """Full metrics in the metrics.json schema."""
    policy = policy or cfg.empty_policy
    names = CLASS_NAMES[cfg.dataset]
    was = model.training
    model.eval()
    workers = metric_workers(device) if workers is None else workers
    if workers > 1:
        # Each case's distances start while the next case is predicted. forkserver: fresh
        # processes, not forks of a (possibly Ray) worker with live threads.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(context)) as pool:
            futures = [pool.submit(_case_row, c.name, predict(model, c, cfg, device), c.label, names, policy)
                       for c in cases]
            rows = [f.result() for f in futures]
    else:
        rows = [_case_row(c.name, predict(model, c, cfg, device), c.label, names, policy) for c in cases]
    model.train(was)
    per_case = [r for r, _, _ in rows]
    empty, structures = sum(e for _, e, _ in rows), sum(s for _, _, s in rows)
    per_class = {name: {k: float(np.mean([r[name][k] for r in per_case])) for k in METRICS}
                 for name in names}
    out = {k: float(np.mean([per_class[n][k] for n in names])) for k in METRICS}
    # empty_predictions of `structures` (case, class) pairs with the class present were missed
    out.update(per_class=per_class, per_case=per_case, empty_predictions=empty, structures=structures,
               empty_policy=policy, cases=len(per_case))
    return out
