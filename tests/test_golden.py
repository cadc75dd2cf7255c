"""Golden values: the loop's per-iteration losses and final metrics for short fixed-seed CPU
runs of every base and reading, recorded from the code before a refactor (tests/golden/).
A change that only moves code around must reproduce them.

Regenerate (only for a change meant to alter results, saying why in its commit):
    BUARL_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from buarl.config import load_config
from buarl.train import Reporter, train

GOLDEN = Path(__file__).parent / "golden" / "loop.json"
# fp32 and one thread: bf16 depends on the CPU's instructions, threads on the summation order
COMMON = {"precision": "fp32", "threads": 1, "log_every": 1, "eval_every": 3}
CASES = {
    "supervised": ("phantom", {"base": "supervised", "url": False, "crl": False, "iters": 6}),
    "mt": ("phantom", {"base": "mt", "url": False, "crl": False, "iters": 6, "rampup_iters": 4}),
    "mt_mse": ("phantom", {"base": "mt", "mt_consistency": "mse", "url": False, "crl": False, "iters": 6,
                           "lambda_crl": 0.1}),
    "bcp": ("phantom", {"url": False, "crl": False, "pretrain_iters": 3, "iters": 4}),
    "buarl": ("phantom", {"pretrain_iters": 3, "iters": 4, "tau_l": 0.2, "tau_u": 0.6}),
    "buarl_term_soft_quantile": ("phantom", {"pretrain_iters": 3, "iters": 4, "url_mode": "term",
                                             "crl_mode": "soft", "region_mode": "quantile", "tau_l": 0.8}),
    "bcp_3d": ("phantom_la", {"url": False, "crl": False, "pretrain_iters": 2, "iters": 3,
                              "patch_size": [32, 32, 32]}),
}


class Record(Reporter):
    def __init__(self):
        self.losses, self.vals = [], []

    def log(self, step, scalars):
        self.losses.append(scalars["loss"])

    def checkpoint(self, step, metrics, state, is_best):
        self.vals.append(metrics["val_dice"])


def run(name: str, root: Path) -> dict:
    config, sets = CASES[name]
    cfg = load_config(config, {"data_root": str(root), **COMMON, **sets})
    rec = Record()
    metrics = train(cfg, rec)
    return {"losses": rec.losses, "vals": rec.vals,
            "test": {k: metrics[k] for k in ("dice", "jaccard", "hd95", "asd")}, "last_dice": metrics["last"]["dice"]}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_loop_reproduces_its_recorded_values(name, golden, acdc_phantom, la_phantom):
    got = run(name, la_phantom if CASES[name][0] == "phantom_la" else acdc_phantom)
    if os.environ.get("BUARL_WRITE_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        data[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    want = golden[name]
    # float32 kernels round differently from CPU to CPU: equal to rounding, not bit for bit
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-4, abs=1e-6)
    assert got["vals"] == pytest.approx(want["vals"], abs=1e-3)
    assert got["test"] == pytest.approx(want["test"], rel=1e-3, abs=1e-3)
    assert got["last_dice"] == pytest.approx(want["last_dice"], abs=1e-3)
