"""The evaluation's faster path gives today's numbers: medpy's hd95 and asd from one shared
set of surface distances, and the same metrics whether distances run in-process or in a
process pool (issue 12, G5)."""
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


def _shifted_predictions_match_medpy(cases):
    checked = 0
    for case in cases:
        pred = np.roll(case.label, 2, axis=-1)  # a stand-in prediction with real surface distances
        pred[..., :5, :] = 0
        for c in range(1, int(case.label.max()) + 1):
            p, g = pred == c, case.label == c
            if p.any() and g.any():
                ours, empty = case_metrics(p, g)
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
def test_metrics_equal_medpy_on_real_acdc_volumes():
    cfg = load_config("acdc_cpu", {"data_root": str(SHARED / "ACDC"), "base": "supervised", "labeled": 1,
                                   "test_cases": 3, "val_cases": 1})
    _shifted_predictions_match_medpy(load_benchmark(cfg).test)


def test_metrics_equal_medpy_on_phantom_volumes(acdc_phantom):
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "base": "supervised", "labeled": 1})
    _shifted_predictions_match_medpy(load_benchmark(cfg).test)


@pytest.mark.slow
def test_process_pool_gives_the_same_metrics(acdc_phantom):
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "base": "supervised", "labeled": 1,
                                  "precision": "fp32"})
    torch.manual_seed(0)
    model = build("acdc", 4)
    cases = load_benchmark(cfg).test
    one = evaluate(model, cases, cfg, torch.device("cpu"), workers=1)
    two = evaluate(model, cases, cfg, torch.device("cpu"), workers=2)
    assert one == two
    assert one["per_case"] and all(set(r) == {"case", "RV", "Myo", "LV"} for r in one["per_case"])
    assert set(METRICS) <= set(one)
