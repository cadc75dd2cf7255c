"""How to spend a small CPU machine on a sweep: one trial with all cores as torch threads,
or one trial per core with one thread each. Measures the aggregate self-training
throughput (BCP+URL+CRL steps of the acdc_cpu protocol, 128x128, batch 16, on the phantom)
of both layouts in one run and writes bench/results/concurrency.json.

    python bench/concurrency.py [--iters 40]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(iters: int, threads: int) -> None:
    """One trial's self-training steps; prints its iterations per second."""
    import torch

    from buarl.config import load_config
    from buarl.train import Loop, Reporter

    class Rate(Reporter):
        it_per_s = 0.0

        def log(self, step, scalars):
            self.it_per_s = scalars["it_per_s"]

    torch.set_num_threads(threads)
    cfg = load_config("acdc_cpu", {"pretrain_iters": 0, "iters": iters, "log_every": iters,
                                   "eval_every": 10 * iters, "threads": threads})
    rep = Rate()
    loop = Loop(cfg, rep, lambda m: m)
    loop.validate = lambda stage: None  # throughput of training only
    loop.total = iters
    loop.run()  # the rate is taken at the last log, before the (unmeasured) test evaluation
    print(json.dumps({"it_per_s": rep.it_per_s}), flush=True)


def layout(trials: int, threads: int, iters: int) -> float:
    """Aggregate iterations per second of `trials` concurrent processes."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(threads), "--iters", str(iters)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(trials)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["it_per_s"] for p in procs]
    return sum(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.iters, a.child)
    cores = os.cpu_count() or 1
    start = time.time()
    one = layout(1, cores, a.iters)
    many = layout(cores, 1, a.iters)
    out = {"cores": cores, "iters_per_trial": a.iters, "protocol": "acdc_cpu self-training (bcp+url+crl)",
           "one_trial_all_threads_it_per_s": round(one, 3),
           "one_trial_per_core_it_per_s": round(many, 3),
           "per_core_over_all_threads": round(many / one, 2), "wall_s": round(time.time() - start, 1)}
    path = Path(__file__).resolve().parent / "results" / "concurrency.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
