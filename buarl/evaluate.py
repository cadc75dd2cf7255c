"""The reference evaluation protocols and metrics (medpy dc, jc, hd95, asd).

ACDC: each slice zoomed to the training size, predicted, zoomed back (order 0); per class
1..3, mean over volumes, then over classes. LA: sliding window (UA-MT), foreground where
its probability > 0.5, optional largest connected component.
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
from medpy import metric
from medpy.metric.binary import __surface_distances as surface_distances  # noqa: the one medpy helper hd95 and asd share
from scipy import ndimage
from torch import nn

from buarl.config import Config
from buarl.data.acdc import to_size
from buarl.data.types import Case
from buarl.method.pseudo import largest_component
from buarl.runtime import autocast, memory_format

CLASS_NAMES = {"acdc": ["RV", "Myo", "LV"], "la": ["LA"]}
METRICS = ("dice", "jaccard", "hd95", "asd")


def case_metrics(pred: np.ndarray, gt: np.ndarray, policy: str = "reference") -> tuple[dict, bool]:
    """Metrics of one binary prediction against one binary ground truth.

    Returns (metrics, empty) where `empty` flags a prediction that missed a present class.
    """
    pred, gt = pred.astype(bool), gt.astype(bool)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if has_p and has_g:
        # medpy's hd95 and asd, computing the prediction-to-truth distances once for both
        # (identical values: tests/test_evaluation_speed.py)
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


@torch.no_grad()
def predict_acdc(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device) -> np.ndarray:
    x = torch.from_numpy(to_size(image, cfg.image_size))[:, None].to(device)
    x = x.contiguous(memory_format=memory_format(cfg, 2))
    with autocast(cfg, device):
        pred = model(x).argmax(1).cpu().numpy().astype(np.uint8)
    h, w = image.shape[-2:]
    return np.stack([ndimage.zoom(p, (h / p.shape[0], w / p.shape[1]), order=0) for p in pred])


def _windows(size: int, patch: int, stride: int) -> list[int]:
    n = max(1, math.ceil((size - patch) / stride) + 1)
    return sorted({min(stride * i, size - patch) for i in range(n)})


@torch.no_grad()
def predict_la(model: nn.Module, image: np.ndarray, cfg: Config, device: torch.device,
               batch: int = 4) -> np.ndarray:
    """UA-MT sliding window: average softmax over windows, foreground probability > 0.5."""
    patch = cfg.patch_size
    pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(image.shape, patch)]
    padded = np.pad(image, pad)
    score = np.zeros((2,) + padded.shape, np.float32)
    count = np.zeros(padded.shape, np.float32)
    starts = [(x, y, z) for x in _windows(padded.shape[0], patch[0], cfg.la_stride_xy)
              for y in _windows(padded.shape[1], patch[1], cfg.la_stride_xy)
              for z in _windows(padded.shape[2], patch[2], cfg.la_stride_z)]
    for i in range(0, len(starts), batch):
        chunk = starts[i:i + batch]
        sl = [tuple(slice(a, a + p) for a, p in zip(s, patch)) for s in chunk]
        x = torch.from_numpy(np.stack([padded[s] for s in sl]))[:, None].to(device)
        x = x.contiguous(memory_format=memory_format(cfg, 3))
        with autocast(cfg, device):
            probs = torch.softmax(model(x).float(), 1).cpu().numpy()
        for s, p in zip(sl, probs):
            score[(slice(None),) + s] += p
            count[s] += 1
    fg = score[1] / count > 0.5
    crop = tuple(slice(a, fg.shape[k] - b) for k, (a, b) in enumerate(pad))
    pred = fg[crop].astype(np.uint8)
    if cfg.la_lcc:
        pred = largest_component(pred)
    return pred


def predict(model: nn.Module, case: Case, cfg: Config, device: torch.device) -> np.ndarray:
    fn = predict_acdc if cfg.dataset == "acdc" else predict_la
    return fn(model, case.image, cfg, device)


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
