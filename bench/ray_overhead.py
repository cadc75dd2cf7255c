"""G6 (issue 12): what Ray Tune + MLflow add to a sweep. The same trials run twice in one
go: bare, one `buarl train` process after another, and as one `buarl-sweep` per `--runners`
entry (a local Ray cluster, one trial at a time, every trial tracked in MLflow). Both sides are timed from
process start to exit, so the sweep's cluster start, data check, MLflow runs and shutdown
all count. Same seeds on the CPU give the same metrics, so the test Dice of each trial is
compared too: the sweep did the same work, not less. The loops' speed drifts by a few % from
run to run on a shared machine, so the time outside them (wall minus the loops'
train_seconds, sweep against bare) is reported beside the wall ratio. The machine can also
drift for tens of minutes, so the bare runs are made again after the sweeps and the sweeps are
compared with the mean of the two passes (their drift is reported). Writes
bench/results/ray_overhead.json.

    python bench/ray_overhead.py --data-root ../shared/data/ACDC      # ~5-minute trials
    python bench/ray_overhead.py --data-root ../shared/data/ACDC --runners auto train   # both, side by side
    python bench/ray_overhead.py --smoke                               # the phantom, ~2 minutes

Run it alone: a second local Ray cluster on the machine is refused, and anything else using
the cores shows up as overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO, TARGET_FIXED_S = 1.10, 10.0  # issue 12, G6
# ~5 minutes of BUARL (bcp + url + crl) on 2 cores at acdc_cpu's shapes, 3 labeled patients
REAL = {"base_config": "acdc_cpu", "fixed": {"pretrain_iters": 250, "iters": 500, "eval_every": 125}}
SMOKE = {"base_config": "phantom", "fixed": {"pretrain_iters": 10, "iters": 20, "eval_every": 10}}


RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "log_monitor")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds so far) of every process on the machine. Ray retitles its
    processes (ray::ImplicitFunc -> ray::ImplicitFunc.train), so pids are the keys and a
    title is cut at its first dot."""
    daemons = ("sweep.py", *RAY_DAEMONS)
    out = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        cmd, times = " ".join(proc.info["cmdline"] or []), proc.info["cpu_times"]
        if times is None:  # gone, or not ours to read
            continue
        if cmd.startswith("ray::"):
            name = cmd.split()[0].split(".")[0]
        else:
            name = next((k for k in daemons if k in cmd), proc.info["name"])
        out[proc.pid] = (name, times.user + times.system)
    return out


class CpuWatch:
    """Per-process CPU used while a command runs: what Ray's own processes take beside the
    training worker (the cores a 2-core trial loses to them)."""

    def __init__(self, period: float = 5.0):
        self.period, self.stop, self.last, self.used, self.names = period, False, {}, {}, {}

    def run(self) -> None:
        first = True
        while not self.stop:
            now = cpu_seconds()
            for pid, (name, sec) in now.items():
                # a process first seen after the start began during the command: all its CPU counts
                before = self.last.get(pid, sec if first else 0.0)
                self.used[pid] = self.used.get(pid, 0.0) + max(0.0, sec - before)
                self.last[pid] = sec
                # an exiting process shows only its kernel name, cut at 15 characters
                # (ray::RayTrainWo): it keeps the full title it was seen with
                known = self.names.get(pid)
                if not (known and len(name) <= 15 and known.startswith(name)):
                    self.names[pid] = name
            first = False
            time.sleep(self.period)

    def by_name(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for pid, sec in self.used.items():
            total[self.names[pid]] = total.get(self.names[pid], 0.0) + sec
        return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def timed(cmd: list[str], log: Path, watch: CpuWatch | None = None) -> float:
    start = time.perf_counter()
    if watch:
        threading.Thread(target=watch.run, daemon=True).start()
    with log.open("w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if watch:
        watch.stop = True
    if rc:
        sys.exit(f"ray_overhead: {' '.join(cmd[:3])} ... exited {rc}; its output: {log}")
    return wall


def sweep_trials(tracking_uri: str, experiment: str) -> dict[int, dict]:
    """seed -> {test_dice, train_seconds} of the sweep's finished trial runs."""
    import mlflow
    from orchestrator.names import flat_run_metrics

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.buarl.role = 'trial'") if exp else []
    out = {}
    for r in runs:
        metrics = flat_run_metrics(r.data.metrics)
        if r.info.status == "FINISHED" and "test_dice" in metrics:
            out[int(float(r.data.params["seed"]))] = {"test_dice": metrics["test_dice"],
                                                    "train_seconds": metrics.get("train_seconds")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="real ACDC (default: the phantom, with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny phantom trials: checks the script, not Ray")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--labeled", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runners", nargs="+", choices=["auto", "train"], default=["auto"],
                   help="one sweep per runner after the bare runs (auto: a one-worker trial runs its loop "
                        "in the Tune trial; train: under a TorchTrainer as before)")
    p.add_argument("--no-second-pass", action="store_true",
                   help="skip the bare runs after the sweeps (compare with the first pass alone)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray_overhead.json")
    a = p.parse_args()
    if not a.smoke and not a.data_root:
        p.error("give --data-root (real ACDC) or --smoke")
    shape = SMOKE if a.smoke else REAL
    data = [] if a.smoke else ["--data-root", str(Path(a.data_root).resolve())]
    work = Path(tempfile.mkdtemp(prefix="buarl_g6_"))
    bin_dir = Path(sys.executable).parent

    def bare_pass(n: int) -> dict:
        out = {}
        for seed in a.seeds:
            sets = [f"{k}={v}" for k, v in {**shape["fixed"], "labeled": a.labeled, "seed": seed,
                                             "threads": a.threads}.items()]
            run = work / f"bare{n}_{seed}"
            # sampled like the sweeps, so the sampler's own CPU weighs on both sides
            wall = timed([str(bin_dir / "buarl"), "train", "--config", shape["base_config"], *data,
                          "--set", *sets, "--out", str(run)], work / f"bare{n}_{seed}.log", CpuWatch())
            metrics = json.loads((run / "metrics.json").read_text())
            out[seed] = {"wall_s": wall, "test_dice": metrics["dice"], "train_seconds": metrics["train_seconds"]}
            print(f"bare pass {n}, seed {seed}: {wall:.1f} s, test Dice {metrics['dice']:.4f}", flush=True)
        return out

    passes = [bare_pass(1)]
    raw = {}
    for runner in a.runners:
        name = f"g6_{runner}"
        space = {"description": f"G6 bench: the bare trials as a sweep (runner {runner})",
                 "base_config": shape["base_config"], "phantom_config": shape["base_config"], "fixed": shape["fixed"],
                 "grid": {"labeled": [a.labeled], "seed": a.seeds}, "num_samples": 1,
                 "resources": {"workers": 1, "cpus_per_worker": 1, "runner": runner}}
        (work / f"{name}.yaml").write_text(yaml.safe_dump(space))
        uri = f"sqlite:///{work / 'mlflow.db'}"
        watch = CpuWatch()
        sweep_wall = timed([sys.executable, str(ROOT / "orchestrator" / "sweep.py"), "--space", str(work / f"{name}.yaml"),
                            *data, "--tracking-uri", uri, "--storage", str(work / "ray_results"),
                            "--threads", str(a.threads), "--max-concurrent", "1"], work / f"{name}.log", watch)
        trials = sweep_trials(uri, name)
        if set(trials) != set(a.seeds):
            sys.exit(f"ray_overhead: the sweep finished trials for seeds {sorted(trials)}, expected {a.seeds}; "
                     f"its output: {work / (name + '.log')}")
        raw[runner] = (sweep_wall, trials, watch.by_name())
        print(f"sweep (runner {runner}): {sweep_wall:.1f} s", flush=True)
    if not a.no_second_pass:
        passes.append(bare_pass(2))
    bare = {s: {k: sum(p[s][k] for p in passes) / len(passes) for k in passes[0][s]} for s in a.seeds}
    bare_sum = sum(b["wall_s"] for b in bare.values())
    bare_train = sum(b["train_seconds"] for b in bare.values())
    sweeps = {}
    for runner, (sweep_wall, trials, cpu) in raw.items():
        # the loop's process: a Train worker, or the Tune trial itself for a one-worker trial
        trainer = "ray::RayTrainWorker" if runner == "train" else "ray::ImplicitFunc"
        fixed = (sweep_wall - bare_sum) / len(a.seeds)
        ratio = sweep_wall / bare_sum
        # The loops' own speed drifts by a few % between runs on a shared VM; the time outside
        # them (start, data, evaluation, tracking, stop) is what Ray and the sweep add or save.
        sweep_train = sum(t["train_seconds"] for t in trials.values())
        outside = (sweep_wall - sweep_train - (bare_sum - bare_train)) / len(a.seeds)
        sweeps[runner] = {
            "sweep_wall_s": round(sweep_wall, 1), "ratio": round(ratio, 3), "fixed_cost_per_trial_s": round(fixed, 1),
            "sweep_trials": {str(s): {k: (round(v, 4) if v is not None else None) for k, v in t.items()}
                             for s, t in trials.items()},
            "loops_ratio": round(sweep_train / bare_train, 3),
            "outside_loops_s": round(sweep_wall - sweep_train, 1),
            "fixed_cost_per_trial_outside_loops_s": round(outside, 1),
            # CPU seconds per process name during the sweep: the training process against Ray's own
            "sweep_cpu_seconds": {k: round(v, 1) for k, v in cpu.items() if v >= 1.0},
            "training_process": trainer,
            "ray_own_cpu_seconds": round(sum(v for k, v in cpu.items() if k.startswith("ray::") and k != trainer
                                             or k in RAY_DAEMONS), 1),
            # against every bare pass: a run that is not deterministic shows here, the timings kept
            "same_test_dice": all(abs(trials[s]["test_dice"] - p[s]["test_dice"]) < 1e-9
                                  for p in passes for s in a.seeds),
            "met": bool(ratio <= TARGET_RATIO and fixed <= TARGET_FIXED_S)}
        print(f"sweep (runner {runner}): {sweep_wall:.1f} s, {ratio:.3f}x bare, {fixed:.1f} s per trial "
              f"({outside:.1f} s per trial outside the loops, the loops {sweep_train / bare_train:.3f}x bare's)",
              flush=True)

    out = {
        "target": f"sweep wall <= {TARGET_RATIO} x sum of bare; fixed cost per trial <= {TARGET_FIXED_S} s",
        "smoke": a.smoke, "data_root": a.data_root, "base_config": shape["base_config"],
        "fixed": shape["fixed"], "labeled": a.labeled, "threads": a.threads,
        "bare": {str(s): {k: round(v, 4) for k, v in b.items()} for s, b in bare.items()},
        "bare_passes": [{str(s): round(b["wall_s"], 1) for s, b in p.items()} for p in passes],
        # the second pass's wall over the first's: how far the machine drifted meanwhile
        "bare_drift": round(sum(b["wall_s"] for b in passes[-1].values())
                            / sum(b["wall_s"] for b in passes[0].values()), 3),
        "bare_wall_sum_s": round(bare_sum, 1), "bare_outside_loops_s": round(bare_sum - bare_train, 1),
        "sweeps": sweeps,
        "met": sweeps[a.runners[0]]["met"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "work_dir": str(work),
    }
    import torch
    import ray
    out["machine"].update(torch=torch.__version__, ray=ray.__version__)
    if not a.smoke:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
