"""The reference evaluation protocols' metrics (medpy's dc, jc, hd95 and asd, bit for bit,
computed here without medpy: tests/test_evaluation.py) on the volume predictions of
`buarl.inference`: per class 1..3, mean over volumes, then over classes.
Empty predictions never crash: the reference policy scores a missed class (0, 0, 0, 0)
as BCP does, the strict policy gives it the image diagonal as distance; both count it.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Iterable

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from torch import nn

from buarl.config import Config, class_names_of
from buarl.data.types import Case
from buarl.inference import predict

METRICS = ("dice", "jaccard", "hd95", "asd")


def crop_to_objects(*masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """The masks cut to the bounding box of their union. No metric changes: counts do not,
    every surface voxel (so every nearest-surface distance) lies inside the box, and a voxel
    on the box's face erodes alike in both (its outer neighbour is background in the volume
    and beyond the edge, which erosion counts as background, in the crop). The erosion then
    covers the heart, not the whole scan (timed in bench/evaluation.py)."""
    union = np.logical_or.reduce(masks)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    return tuple(m[box] for m in masks)


def surface(mask: np.ndarray) -> np.ndarray:
    """Coordinates of medpy's surface voxels: the mask minus its erosion by the
    face-connected cross (connectivity 1), the border medpy's hd95 and asd measure between."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return np.argwhere(mask ^ ndimage.binary_erosion(mask, structure=cross, iterations=1))


def surface_distances(a: np.ndarray, b: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """For every surface voxel of `a` its distance to the nearest surface voxel of `b`, and
    the reverse (voxel units, as the protocols call medpy without spacing).

    medpy gets these from a distance transform of the whole (cropped) grid; a k-d tree over
    the surface voxels finds the same nearest voxels exactly (an exact search; both take the
    correctly rounded root of the same integer sum of squares, so the values are bit for bit
    medpy's: tests/test_evaluation.py), in time that grows with the surface, not the box, and
    its queries run on `threads` cores (bench/evaluation.py)."""
    sa, sb = surface(a), surface(b)
    return cKDTree(sb).query(sa, workers=threads)[0], cKDTree(sa).query(sb, workers=threads)[0]


def case_metrics(pred: np.ndarray, gt: np.ndarray, policy: str = "reference", threads: int = 1) -> tuple[dict, bool]:
    """Metrics of one binary prediction against one binary ground truth.

    Returns (metrics, empty) where `empty` flags a prediction that missed a present class.
    """
    pred, gt = pred.astype(bool), gt.astype(bool)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if has_p and has_g:
        pred, gt = crop_to_objects(pred, gt)
        # medpy's hd95 (95th percentile of both directions) and asd (mean of prediction to
        # truth) from one set of distances
        pred_to_gt, gt_to_pred = surface_distances(pred, gt, threads)
        # medpy's dc and jc, to the bit (the same integer counts, the same division), without
        # importing medpy, whose scipy.stats import each evaluating process would pay
        # (medpy_import_s in bench/results/evaluation.json)
        inter, total = _overlap(pred, gt)
        return {"dice": 2.0 * inter / float(total), "jaccard": inter / float(total - inter),
                "hd95": float(np.percentile(np.hstack((pred_to_gt, gt_to_pred)), 95)),
                "asd": float(pred_to_gt.mean())}, False
    empty = has_g and not has_p
    if policy == "reference":
        return dict.fromkeys(METRICS, 0.0), empty
    if not has_p and not has_g:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}, False
    diagonal = float(math.sqrt(sum(s * s for s in gt.shape)))
    return {"dice": 0.0, "jaccard": 0.0, "hd95": diagonal, "asd": diagonal}, empty


def _overlap(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """|pred & gt| and |pred| + |gt|: what medpy's dc and jc divide."""
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))


def dice_only(pred: np.ndarray, gt: np.ndarray) -> float:
    """Fast Dice for validation (same value as medpy's dc; 0 when both are empty)."""
    inter, total = _overlap(pred, gt)
    return 2.0 * inter / total if total else 0.0


def validation_scores(model: nn.Module, cases: Iterable[Case], cfg: Config, device: torch.device) -> dict:
    """Mean foreground Dice over cases and classes (model selection; no distances), and the
    fraction of val voxels predicted / labeled foreground (a collapse to background shows)."""
    scores, fg_pred, fg_true, voxels = [], 0, 0, 0
    # BCP selects on the raw prediction (its var_all_case_LA keeps every component); the
    # largest-component step (la_lcc, its test_LA.py --nms) belongs to the test evaluation.
    cfg = cfg.model_copy(update={"la_lcc": False})
    with evaluating(model, shape_search=True):
        for case in cases:
            pred = predict(model, case, cfg, device)
            scores.append([dice_only(pred == c, case.label == c) for c in range(1, cfg.num_classes)])
            fg_pred += np.count_nonzero(pred)
            fg_true += np.count_nonzero(case.label)
            voxels += pred.size
    nan = float("nan")
    return {"dice": float(np.mean(scores)) if scores else nan,
            "fg_pred": fg_pred / voxels if voxels else nan, "fg_true": fg_true / voxels if voxels else nan}


@contextlib.contextmanager
def evaluating(model: nn.Module, shape_search: bool):
    """The model in eval mode; without `shape_search`, cuDNN's algorithm search off (CUDA).
    Training turns the search on for its fixed batch shapes. It pays where an evaluation's
    shapes repeat (validation runs again and again; LA's windows share one shape), not
    where each input is new: an ACDC test volume's slice count is its batch, and the 40
    test volumes have several counts (BENCHMARKS.md, G5). Both are restored."""
    was, search = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = search and shape_search
    try:
        yield model
    finally:
        model.train(was)
        torch.backends.cudnn.benchmark = search


def _case_row(name: str, pred: np.ndarray, label: np.ndarray, classes: list[str], policy: str,
              threads: int) -> tuple[dict, int, int]:
    row: dict = {"case": name}
    empty = structures = 0
    for c, cls in enumerate(classes, start=1):
        gt = label == c
        m, e = case_metrics(pred == c, gt, policy, threads)
        empty += int(e)
        structures += int(gt.any())
        row[cls] = {k: float(v) for k, v in m.items()}
    return row, empty, structures


def evaluate(model: nn.Module, cases: list[Case], cfg: Config, device: torch.device,
             policy: str | None = None) -> dict:
    """Full metrics in the metrics.json schema, with the seconds its predictions and its
    metrics took. The surface distances' searches use the process's torch threads: the
    network is idle while they run."""
    policy = policy or cfg.empty_policy
    names = class_names_of(cfg.dataset, cfg.class_names)
    threads = torch.get_num_threads()
    rows, seconds = [], {"predict": 0.0, "metrics": 0.0}
    with evaluating(model, shape_search=cfg.dataset != "acdc"):
        for case in cases:
            began = time.perf_counter()
            pred = predict(model, case, cfg, device)  # a host array: the device work is done
            predicted = time.perf_counter()
            rows.append(_case_row(case.name, pred, case.label, names, policy, threads))
            seconds["predict"] += predicted - began
            seconds["metrics"] += time.perf_counter() - predicted
    per_case = [r for r, _, _ in rows]
    empty, structures = sum(e for _, e, _ in rows), sum(s for _, _, s in rows)
    per_class = {name: {k: float(np.mean([r[name][k] for r in per_case])) for k in METRICS}
                 for name in names}
    out = {k: float(np.mean([per_class[n][k] for n in names])) for k in METRICS}
    # empty_predictions of `structures` (case, class) pairs with the class present were missed
    out.update(per_class=per_class, per_case=per_case, empty_predictions=empty, structures=structures,
               empty_policy=policy, cases=len(per_case), seconds={k: round(v, 3) for k, v in seconds.items()})
    return out
