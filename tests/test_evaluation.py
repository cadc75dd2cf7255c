"""The evaluation's faster path gives medpy's numbers exactly: hd95 and asd from one shared
set of surface distances, found by a k-d tree over the surface voxels (on one or several
threads) instead of medpy's distance transform, in the objects' bounding box (issue 12, G5)."""
import numpy as np
import pytest
import torch
from medpy import metric

from buarl.config import load_config
from buarl.data import load_benchmark
from buarl.evaluate import METRICS, case_metrics, evaluate
from buarl.nets import build
from tests.conftest import SHARED, needs_real_data


def _medpy(pred, gt):
    return {"dice": metric.binary.dc(pred, gt), "jaccard": metric.binary.jc(pred, gt),
            "hd95": metric.binary.hd95(pred, gt), "asd": metric.binary.asd(pred, gt)}


def _shifted_predictions_match_medpy(cases, threads=1):
    checked = 0
    for case in cases:
        pred = np.roll(case.label, 2, axis=-1)  # a stand-in prediction with real surface distances
        pred[..., :5, :] = 0
        for c in range(1, int(case.label.max()) + 1):
            p, g = pred == c, case.label == c
            if p.any() and g.any():
                ours, empty = case_metrics(p, g, threads=threads)
                assert not empty and ours == _medpy(p, g)  # exactly, not approximately
                checked += 1
    assert checked >= 3


@pytest.mark.parametrize("shape", [(40, 36), (9, 40, 36)])
def test_cropped_metrics_equal_medpy_on_the_whole_volume(shape):
    """The distances are computed in the objects' bounding box; medpy sees the whole volume.
    Blobs are placed anywhere, also against the volume's edge (where erosion meets the edge)."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    checked = edge = 0
    for _ in range(40):
        noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
        blob = noise > np.quantile(noise, rng.uniform(0.85, 0.99))
        gt = np.zeros(shape, bool)
        lo = [int(rng.integers(0, s // 2)) for s in shape]
        cut = tuple(slice(a, None) for a in lo)
        gt[cut] = blob[tuple(slice(0, s - a) for s, a in zip(shape, lo))]
        pred = np.roll(gt, int(rng.integers(-3, 4)), axis=-1) ^ (rng.random(shape) > 0.995)
        if not (pred.any() and gt.any()):
            continue
        edge += any(m.take(i, axis=a).any() for m in (pred, gt) for a in range(len(shape)) for i in (0, -1))
        ours, empty = case_metrics(pred, gt)
        assert not empty and ours == _medpy(pred, gt)  # exactly
        checked += 1
    assert checked >= 30 and edge >= 10


@needs_real_data
@pytest.mark.parametrize("threads", [1, 2])
def test_metrics_equal_medpy_on_real_acdc_volumes(threads):
    cfg = load_config("acdc_cpu", {"data_root": str(SHARED / "ACDC"), "base": "supervised", "labeled": 1,
                                   "test_cases": 3, "val_cases": 1})
    _shifted_predictions_match_medpy(load_benchmark(cfg).test, threads)


def test_metrics_equal_medpy_on_phantom_volumes(acdc_phantom):
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "base": "supervised", "labeled": 1})
    _shifted_predictions_match_medpy(load_benchmark(cfg).test)


def test_surface_distances_equal_medpys_in_both_directions():
    """Ragged, noisy masks (many surface voxels, holes, stray voxels): every distance, in
    medpy's order, bit for bit."""
    from medpy.metric.binary import __surface_distances as medpy_distances
    from scipy import ndimage

    from buarl.evaluate import surface_distances

    rng = np.random.default_rng(3)
    for shape in [(30, 33), (7, 30, 33)]:
        for _ in range(10):
            a = ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.5
            b = (ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5) | (rng.random(shape) > 0.98)
            ab, ba = surface_distances(a, b, threads=2)
            assert np.array_equal(ab, medpy_distances(a, b, None, 1))
            assert np.array_equal(ba, medpy_distances(b, a, None, 1))
            assert ab.size == np.count_nonzero(a ^ ndimage.binary_erosion(a)) > 0  # one per surface voxel


def test_evaluation_restores_the_models_mode_and_cudnns_search(acdc_phantom, monkeypatch):
    """Evaluation runs in eval mode without cuDNN's per-shape search for ACDC volumes (a new
    slice count is a new shape); the trainer's settings come back, and the metrics keep
    medpy's values on the phantom's test cases."""
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "base": "supervised", "labeled": 1,
                                  "precision": "fp32"})
    torch.manual_seed(0)
    model = build("acdc", 4).train()
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: seen.append((model.training, torch.backends.cudnn.benchmark))
                        or forward(x))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    out = evaluate(model, load_benchmark(cfg).test, cfg, torch.device("cpu"))
    assert seen and set(seen) == {(False, False)}
    assert model.training and torch.backends.cudnn.benchmark
    assert out["cases"] == len(out["per_case"]) > 0 and set(out["seconds"]) == {"predict", "metrics"}
    assert all(set(r) == {"case", "RV", "Myo", "LV"} for r in out["per_case"])
    assert set(METRICS) <= set(out)


def test_metrics_run_without_importing_medpy():
    """medpy is the tests' reference only: its import (scipy.stats) would cost every
    evaluating process (bench/evaluation.py's medpy_import_s)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from buarl.evaluate import case_metrics\n"
            "a = np.zeros((9, 9), bool); a[2:6, 2:6] = True\n"
            "m, _ = case_metrics(a, np.roll(a, 1, 0)); assert m['hd95'] == 1.0, m\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'medpy' or k == 'scipy.stats'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_la_largest_component_applies_to_the_test_evaluation_not_to_validation():
    """BCP's test_LA.py keeps the largest component (--nms 1); its training validation
    (var_all_case_LA) scores the raw prediction. A model that predicts foreground exactly where
    the image is positive, on a case whose two blobs are both labeled: validation Dice 1, the
    test evaluation with la_lcc drops the smaller blob."""
    import torch

    from buarl.config import load_config
    from buarl.data.types import Case
    from buarl.evaluate import evaluate, validation_scores

    class Sign(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return torch.cat([-x, x], 1) * self.w

    image = -np.ones((20, 20, 16), np.float32)
    image[2:8, 2:8, 2:8] = 1
    image[12:15, 12:15, 10:13] = 1
    label = (image > 0).astype(np.uint8)
    cfg = load_config("phantom_la", {"patch_size": [16, 16, 16], "la_stride_xy": 8, "la_stride_z": 8,
                                     "la_lcc": True, "precision": "fp32"})
    case = Case(name="two_blobs", image=image, label=label)
    assert validation_scores(Sign(), [case], cfg, torch.device("cpu"))["dice"] == 1.0
    kept = 216 / (216 + 27)
    assert evaluate(Sign(), [case], cfg, torch.device("cpu"))["dice"] == pytest.approx(2 * kept / (1 + kept))
