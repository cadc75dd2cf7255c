"""G4 (issue 12): where an `acdc_cpu` self-training iteration spends its time on this CPU,
per part, the network (teacher and student forwards, backward, optimizer step) apart from
the loop's own work (data and augmentation, uncertainty and weight maps, copy-paste mixing,
pseudo-label clean-up, loss, EMA, logging). BUARL (bcp + URL + CRL), fp32 and bf16.
Writes bench/results/loop_profile_<cpu>.json.

    python bench/loop_profile.py --data-root ../shared/data/ACDC [--iters 30]

cProfile attributes each function's cumulative time (its own overhead inflates the Python-heavy\nparts a little); the parts never nest in one another.
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import platform
import pstats
from pathlib import Path

import torch

from buarl.config import load_config
from buarl.engine import Forward
from buarl.data import load_benchmark
from buarl.data.acdc import AcdcData
from buarl.data.sampling import TwoStreamSampler
from buarl.evaluate import evaluate
from buarl.method.mixing import box_mask, mix
from buarl.method.pseudo import pseudo_labels
from buarl.method.teacher import ema_update
from buarl.method.uncertainty import entropy_map
from buarl.engine import cpu_has_fast_bf16
from buarl.train import Loop, Reporter

# part -> the functions whose cumulative time it is (none calls another of the list)
PARTS = {
    "network: teacher forward": [Loop.teacher_probs],
    "network: student forward": [Forward.__call__],
    "network: backward": [torch.Tensor.backward],
    "network: optimizer step": [torch.optim.SGD.step, torch.optim.Optimizer.zero_grad],
    "data + augmentation": [AcdcData.batch, TwoStreamSampler.next],
    "pseudo-label clean-up (LCC)": [pseudo_labels],
    "uncertainty + weight maps": [entropy_map, Loop.weights],
    "copy-paste mixing": [mix, box_mask],
    "loss": [Loop.loss],
    "EMA": [ema_update],
}


def _key(fn) -> tuple[str, int, str]:
    code = inspect.unwrap(fn).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def profile(data_root: str, precision: str, iters: int) -> dict:
    cfg = load_config("acdc_cpu", {"data_root": data_root, "labeled": 3, "base": "bcp", "url": True, "crl": True,
                                   "precision": precision, "pretrain_iters": 0, "iters": iters,
                                   "eval_every": 10 ** 6, "test_cases": 1, "val_cases": 1})
    data = load_benchmark(cfg)
    loop = Loop(cfg, Reporter(), lambda m: m, data)
    prof = cProfile.Profile()
    prof.enable()
    loop.run()
    prof.disable()
    cum = {key: ct for key, (_, _, _, ct, _) in pstats.Stats(prof).stats.items()}

    def total(fns):
        return sum(cum.get(_key(fn), 0.0) for fn in fns)

    run = total([Loop.run]) - total([Loop.validate, evaluate])
    parts = {k: total(v) for k, v in PARTS.items()}
    parts["other (loop body, logging, host syncs)"] = run - sum(parts.values())
    network = sum(v for k, v in parts.items() if k.startswith("network"))
    return {"precision": precision, "iterations": iters, "s_per_iteration": round(run / iters, 4),
            "outside_network_share": round(1 - network / run, 4),
            "parts_s_per_iteration": {k: round(v / iters, 4) for k, v in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args()
    native = cpu_has_fast_bf16()
    out = {"command": "python bench/loop_profile.py --data-root ../shared/data/ACDC", "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
           "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
           "config": "acdc_cpu (128^2, batch 16), BUARL, 3 patients", "target_outside_network_share": 0.10,
           "runs": [profile(a.data_root, prec, a.iters) for prec in (["fp32", "bf16"] if native else ["fp32"])]}
    out["met"] = all(r["outside_network_share"] <= 0.10 for r in out["runs"])
    path = Path(__file__).resolve().parent / "results" / f"loop_profile_{'native_bf16' if native else 'no_native_bf16'}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
