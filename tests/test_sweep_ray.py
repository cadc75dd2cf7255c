"""Sweeps on a local Ray cluster: MLflow runs, Optuna sampling, DDP, resume."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import torch
import yaml

from tests.conftest import ROOT, free_port, mlflow_store

pytestmark = pytest.mark.slow

SPACE = {
    "base_config": "phantom", "phantom_config": "phantom",
    "phantom_fixed": {"pretrain_iters": 4, "iters": 8, "eval_every": 4, "log_every": 4},
    "grid": {"labeled": [2, 3]},
    "search": {"tau_l": {"type": "uniform", "low": 0.1, "high": 0.9},
               "tau_u": {"type": "uniform", "low": 0.1, "high": 0.9}},
    "num_samples": 1, "metric": "best_val_dice", "mode": "max",
}


def _sweep(tmp_path, space, *extra, name="sweep", timeout=900, env_extra=None):
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({**space, "name": name}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "orchestrator" / "sweep.py"), "--space", str(spec),
           "--tracking-uri", mlflow_store(tmp_path), "--storage", str(tmp_path / "ray"), *extra]
    return cmd, env


def _kill_driver(proc) -> None:
    """SIGKILL the driver and everything it started (its local Ray cluster), nothing else on
    the machine."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _runs(tmp_path, experiment):
    import mlflow
    mlflow.set_tracking_uri(mlflow_store(tmp_path))
    return mlflow.search_runs(experiment_names=[experiment])


def test_sweep_logs_one_finished_child_per_trial(tmp_path):
    cmd, env = _sweep(tmp_path, SPACE, "--num-samples", "2", "--max-concurrent", "2")
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "best configuration per grid point" in out.stdout and "mlflow ui --backend-store-uri" in out.stdout
    # every command the sweep prints runs as printed in a fresh shell (no environment active)
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    printed = dict(line.split(":", 1) for line in out.stdout.splitlines()
                   if line.startswith(("Compare runs:", "Tables:", "Studies:")))
    assert set(printed) == {"Compare runs", "Tables", "Studies"}, out.stdout[-2000:]
    tables = subprocess.run(printed["Tables"], shell=True, env=clean, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert tables.returncode == 0, tables.stderr[-2000:]
    assert (tmp_path / "results" / "local" / "sweep" / "README.md").is_file()
    for name, words in (("Compare runs", 2), ("Studies", 1)):  # servers: their command's --help
        argv = shlex.split(printed[name].split("   (")[0])[:words] + ["--help"]
        shown = subprocess.run(argv, env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, (name, argv, shown.stderr[-2000:])
    runs = _runs(tmp_path, "sweep")
    parents = runs[runs["tags.buarl.role"] == "sweep"]
    children = runs[runs["tags.buarl.role"] == "trial"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert len(children) == 4 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert set(children["tags.buarl.code_digest"]) == {parents.iloc[0]["tags.buarl.code_digest"]}
    # the parent run carries the outcome: per grid point the best trial's validation and test
    # Dice (a chart section each), the best over all points, and the best trial's run
    parent = parents.iloc[0]
    for point, g in children.groupby("tags.buarl.grid_point"):
        section = point.replace("=", "-")
        tops = g[g["metrics.val/best_dice"] == g["metrics.val/best_dice"].max()]  # (ties: any of them)
        chosen = tops[tops["run_id"] == json.loads(parent[f"tags.buarl.best.{section}"])["run_id"]]
        assert len(chosen) == 1, (tops["run_id"].tolist(), parent[f"tags.buarl.best.{section}"])
        assert parent[f"metrics.{section}/best_val_dice"] == pytest.approx(chosen.iloc[0]["metrics.val/best_dice"])
        assert parent[f"metrics.{section}/test_dice"] == pytest.approx(chosen.iloc[0]["metrics.test/dice"])
    assert parent["metrics.best/best_val_dice"] == pytest.approx(children["metrics.val/best_dice"].max())
    assert (children["tags.buarl.synthetic"] == "true").all() and parent["tags.buarl.data"] == "ACDC phantom"
    # one Optuna study per label ratio: two grid points, two trials each, two Tune experiments
    assert sorted(children["tags.buarl.grid_point"].value_counts().tolist()) == [2, 2]
    # each trial holds its one CPU (the loop runs in it), so two trials run at once on two cores
    if (os.cpu_count() or 1) >= 2:
        for _, g in children.groupby("tags.buarl.grid_point"):
            a, b = g.sort_values("start_time").itertuples()
            assert b.start_time < a.end_time, "the two trials of a grid point did not overlap"
    # each grid point's Optuna study is persisted in the sweep's optuna.db, and a new sweep
    # warm-started from it continues that study: 2 finished trials copied + 1 new
    import optuna
    db = f"sqlite:///{tmp_path / 'ray' / 'sweep' / 'optuna.db'}"
    done = optuna.trial.TrialState.COMPLETE
    assert {s.study_name: len(optuna.load_study(study_name=s.study_name, storage=db).get_trials(states=(done,)))
            for s in optuna.get_all_study_summaries(db)} == {"labeled=2_seed=1337": 2, "labeled=3_seed=1337": 2}
    assert db in printed["Studies"]
    # the dashboard names the objective, and each Optuna trial names its MLflow run
    for summary in optuna.get_all_study_summaries(db):
        study = optuna.load_study(study_name=summary.study_name, storage=db)
        assert study.metric_names == ["best_val_dice"]
        linked = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(states=(done,))}
        point = children[children["tags.buarl.grid_point"] == summary.study_name]
        assert linked == set(point["run_id"]), (linked, point["run_id"].tolist())
    grown = subprocess.run(cmd + ["--name", "grown", "--warm-start", "sweep", "--num-samples", "1",
                                  "--only", "labeled=2*"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "warm-started with 2 finished trial(s) of sweep 'sweep'" in grown.stdout
    study = optuna.load_study(study_name="labeled=2_seed=1337",
                              storage=f"sqlite:///{tmp_path / 'ray' / 'grown' / 'optuna.db'}")
    assert len(study.get_trials(states=(done,))) == 3
    # every trial's run holds a training curve, one point per log step
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_store(tmp_path))
    steps = [m.step for m in client.get_metric_history(children.iloc[0]["run_id"], "train/loss")]
    assert steps == [8, 12], steps  # self-training's log steps (pre-training's are in its own run)
    assert {p.name for p in (tmp_path / "ray" / "sweep").iterdir() if p.name.startswith("labeled=")} == {
        "labeled=2_seed=1337", "labeled=3_seed=1337"}
    for col in ("test/dice", "test/jaccard", "test/dice_RV", "val/best_dice"):
        assert children[f"metrics.{col}"].between(0, 1).all(), col
    assert (children["metrics.test/hd95"] >= 0).all()
    tau = children[["params.tau_l", "params.tau_u"]].astype(float)
    assert tau.stack().between(0.1, 0.9).all() and tau["params.tau_l"].nunique() == 4, "Optuna must sample"
    assert set(children["params.labeled"]) == {"2", "3"}
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_store(tmp_path))
    run_id = children.iloc[0]["run_id"]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "best.pt", "metrics.json", "regions.png"} <= names
    # the trial's logged model in MLflow's own format loads back and segments
    import mlflow.pytorch
    logged = client.search_logged_models([children.iloc[0]["experiment_id"]], filter_string=f"source_run_id = '{run_id}'")
    assert len(logged) == 1
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{logged[0].model_id}")
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4, 64, 64)
    # each label ratio pre-trained once (4 iterations), its two trials forked from it: their
    # runs hold self-training (8, 12) and link to the pre-training's run, which holds 4
    history = client.get_metric_history(run_id, "val/dice")
    assert [m.step for m in history] == [8, 12]
    pre = runs[runs["tags.buarl.role"] == "pretrain"]
    assert len(pre) == 2 and set(pre["status"]) == {"FINISHED"}
    assert set(children["tags.buarl.pretrained_run"]) == set(pre["run_id"])
    for _, g in children.groupby("tags.buarl.grid_point"):
        assert g["tags.buarl.pretrained_run"].nunique() == 1
    assert [m.step for m in client.get_metric_history(pre.iloc[0]["run_id"], "val/dice")] == [4]
    assert children["metrics.test/last_dice"].between(0, 1).all()
    assert len(list((tmp_path / "ray" / "pretrain").glob("*/pretrained.pt"))) == 2


def test_two_worker_ddp_keeps_replicas_identical(tmp_path, acdc_phantom):
    """Both DDP replicas of buarl's loop end with the same weights (gloo on CPU)."""
    code = f"""
import hashlib, json, os, ray, torch
import ray.train
from ray.train.torch import TorchTrainer, prepare_model
from buarl.config import load_config
from buarl.train import Reporter, train

class Dump(Reporter):
    def finish(self, metrics, best):
        pass

def worker(cfg):
    c = load_config("phantom", cfg)
    rank = ray.train.get_context().get_world_rank()
    holder = {{}}
    def wrap(m):
        holder["m"] = m
        return prepare_model(m, move_to_device=False)
    train(c, Dump(), wrap=wrap)
    core = holder["m"]
    # parameters: DDP all-reduces gradients, so every replica takes the same steps (batch-norm
    # running statistics are local until DDP broadcasts rank 0's at the next forward)
    digest = hashlib.sha256(b"".join(p.detach().double().numpy().tobytes() for p in core.parameters())).hexdigest()
    open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.txt"), "w").write(digest)

ray.init(address="local", num_cpus=3, include_dashboard=False)
TorchTrainer(worker, train_loop_config={{"data_root": {str(acdc_phantom)!r}, "pretrain_iters": 2, "iters": 3,
             "eval_every": 10, "threads": 1}},
             scaling_config=ray.train.ScalingConfig(num_workers=2),
             run_config=ray.train.RunConfig(storage_path={str(tmp_path / 'ray')!r}, name="ddp")).fit()
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert a == b


def test_a_trial_finds_the_checkpoints_it_reported_in_its_storage_folder(tmp_path):
    """What a resumed trial falls back on when Tune's saved state lags (tests/test_reliability.py
    has the choice between them): inside a real Tune trial, its own storage folder lists every
    checkpoint it reported, with their iterations."""
    code = f"""
import json, ray
from ray import tune
from orchestrator.trial import RayReporter, own_checkpoints, write_state

def trainable(config):
    rep = RayReporter(None, [], tune)
    for step in (4, 8):
        rep._report({{"step": step}}, lambda folder, step=step: write_state(folder, {{"step": step}}))
    steps = sorted(s for s, _ in own_checkpoints())
    open({str(tmp_path / 'found.json')!r}, "w").write(json.dumps(steps))

ray.init(address="local", num_cpus=1, include_dashboard=False)
tune.Tuner(trainable, run_config=tune.RunConfig(storage_path={str(tmp_path / 'ray')!r}, name="t")).fit()
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "found.json").read_text() == "[4, 8]"


def test_resume_after_killed_driver_finishes_without_rerunning(tmp_path):
    """Kill the driver once one trial has finished and another has saved a checkpoint past its
    first evaluation and is in Tune's saved state; `--resume` keeps the finished trial's run,
    restores the cut trial from its checkpoint (required, not skipped), and that trial ends
    exactly where the same trial never killed ends."""
    # each trial pre-trains itself here: a trial's own resume (the shared pre-training's:
    # test_a_killed_driver_reuses_the_finished_pretraining_and_forks_equal_a_whole_run)
    fixed = {"pretrain_iters": 4, "iters": 100, "eval_every": 4, "log_every": 4}
    space = {**SPACE, "grid": {"labeled": [2]}, "num_samples": 3, "shared_pretraining": False,
             "phantom_fixed": fixed}
    # Tune saves its experiment state every second, so a trial running for a few seconds is in it
    cmd, env = _sweep(tmp_path, space, "--threads", "1", name="resume", env_extra={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 600
    finished, cut = [], None
    while time.time() < deadline and proc.poll() is None and cut is None:
        time.sleep(1)
        if (tmp_path / "ray" / "resume").exists():  # the driver's MLflow store is ready
            try:
                runs = _runs(tmp_path, "resume")
            except Exception:
                continue
            if "tags.buarl.trial_id" not in runs or "metrics.run/iteration" not in runs:
                continue
            kids = runs[runs["tags.buarl.role"] == "trial"]
            finished = kids[kids["status"] == "FINISHED"]["tags.buarl.trial_id"].tolist()
            running = kids[(kids["status"] == "RUNNING") & (kids["metrics.run/iteration"] >= 8)
                           & (kids["metrics.run/iteration"] <= 80)]
            # (a result reaches MLflow only after its checkpoint is persisted)
            old = running[running["start_time"] < pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=3)]
            if finished and len(old):
                cut = old.iloc[0]["tags.buarl.trial_id"]
    assert cut, ("no trial to cut before the deadline" if proc.poll() is None else
                 f"the sweep ended (exit {proc.returncode}) before a trial could be cut:\n"
                 + proc.stdout.read()[-3000:])
    _kill_driver(proc)
    before = _runs(tmp_path, "resume")
    ended = {r["tags.buarl.trial_id"]: r["end_time"] for _, r in before.iterrows()
             if r["tags.buarl.role"] == "trial" and r["status"] == "FINISHED"}
    run_of = {r["tags.buarl.trial_id"]: r["run_id"] for _, r in before.iterrows() if r["tags.buarl.role"] == "trial"}
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_store(tmp_path))

    out = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = _runs(tmp_path, "resume")
    runs = after[after["tags.buarl.role"] == "trial"]
    kids = runs[runs["status"] == "FINISHED"]
    assert len(kids) == 3 and kids["tags.buarl.trial_id"].nunique() == 3, runs[["status", "tags.buarl.trial_id"]]
    # A trial started in the moment before the kill, but not yet in Tune's saved state, is
    # replaced by a new one on resume; its orphaned run must be marked KILLED, never counted.
    orphans = runs[runs["status"] != "FINISHED"]
    assert len(orphans) <= 1 and (orphans["status"] == "KILLED").all(), orphans[["status", "tags.buarl.trial_id"]]
    # A finished trial keeps its recorded run, even when Tune's saved state lagged its end and
    # the resumed sweep replays it (tests/test_tracking.py pins that case down exactly).
    for trial_id, end in ended.items():
        row = kids[kids["tags.buarl.trial_id"] == trial_id].iloc[0]
        assert row["end_time"] == end
    assert (after[after["tags.buarl.role"] == "sweep"]["status"] == "FINISHED").all()
    # Every finished run holds one continuous history: each evaluation once.
    for _, row in kids.iterrows():
        steps = [m.step for m in client.get_metric_history(row["run_id"], "val/dice")]
        assert steps == list(range(4, 105, 4)), (row["tags.buarl.trial_id"], steps)
    # The cut trial kept its run and was restored from a checkpoint, not restarted...
    row = kids[kids["tags.buarl.trial_id"] == cut].iloc[0]
    assert row["run_id"] == run_of[cut]
    resumed = [m.value for m in client.get_metric_history(row["run_id"], "run/resumed_from")]
    assert max(resumed, default=0) >= 8, resumed
    # ...and ends where the same trial (its sampled thresholds), never killed, ends
    from buarl.config import load_config
    from buarl.train import Reporter, train

    class Collect(Reporter):
        def __init__(self):
            self.val = {}

        def checkpoint(self, step, metrics, state, is_best):
            self.val[step] = metrics["val_dice"]

    bare, threads = Collect(), torch.get_num_threads()
    try:
        metrics = train(load_config("phantom", {**fixed, "labeled": 2, "threads": 1, "tau_l": float(row["params.tau_l"]),
                                                "tau_u": float(row["params.tau_u"])}), bare)
    finally:
        torch.set_num_threads(threads)
    assert {m.step: m.value for m in client.get_metric_history(row["run_id"], "val/dice")} == bare.val
    assert row["metrics.test/dice"] == metrics["dice"]


def test_ctrl_c_stops_the_whole_sweep_and_resume_finishes_it(tmp_path):
    """Tune catches SIGINT itself and returns early; the sweep must stop there, not start
    the next grid point."""
    import threading
    space = {**SPACE, "grid": {"labeled": [2, 3]}}
    cmd, env = _sweep(tmp_path, space, name="ctrlc")
    # A job started in the background by a shell without job control (as CI may run this
    # suite) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: give
    # the sweep a terminal's default disposition, as when a user presses Ctrl-C.
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, running = [], threading.Event()

    def read():  # the driver announces each trial it starts (its progress table may not: every 30 s)
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[labeled=2_seed=1337] trial ") and " started: MLflow run " in line:
                running.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert running.wait(600), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "continue with the same command plus --resume" in out
    assert "=== grid point labeled=3" not in out, out[-3000:]
    assert not list((tmp_path / "ray" / "ctrlc").glob("labeled=3*"))
    runs = _runs(tmp_path, "ctrlc")
    assert runs[runs["tags.buarl.role"] == "sweep"]["status"].tolist() == ["KILLED"]

    done = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = _runs(tmp_path, "ctrlc")
    kids = runs[(runs["tags.buarl.role"] == "trial") & (runs["status"] == "FINISHED")]
    assert sorted(kids["params.labeled"].astype(int)) == [2, 3]
    assert runs[runs["tags.buarl.role"] == "sweep"]["status"].tolist() == ["FINISHED"]

    # resumed once more after a code change (its pre-training hashes differ: here the stored
    # pre-trainings are gone), a sweep whose trials all finished pre-trains nothing again
    import shutil
    from orchestrator.pretrainings import FOLDER
    shutil.rmtree(tmp_path / "ray" / FOLDER)
    again = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("] not needed: the trials of its grid points all finished") == 2, again.stdout[-3000:]
    assert "] started (labeled=" not in again.stdout and not (tmp_path / "ray" / FOLDER).exists()
    after = _runs(tmp_path, "ctrlc")
    assert sorted(after[after["tags.buarl.role"] == "trial"]["run_id"]) == sorted(runs[runs["tags.buarl.role"] == "trial"]["run_id"])


def test_cluster_workers_run_the_drivers_code(tmp_path):
    """A sweep launched from a code snapshot onto a cluster whose nodes import another copy
    (here: this checkout, installed editable), the driver's working directory being that
    checkout (Ray puts it on the workers' path): the workers run the snapshot's code."""
    import shutil
    from buarl.provenance import source_digest
    snap = tmp_path / "snap"
    for pkg in ("buarl", "orchestrator"):
        shutil.copytree(ROOT / pkg, snap / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (snap / "buarl" / "snapshot_marker.py").write_text("# only in the snapshot\n")
    expected = source_digest(snap / "buarl", snap / "orchestrator")
    assert expected != source_digest(ROOT / "buarl", ROOT / "orchestrator")
    space = {**SPACE, "grid": {"labeled": [2]}, "search": {}, "name": "snap"}
    (tmp_path / "snap.yaml").write_text(yaml.safe_dump(space))
    sweep = [sys.executable, str(snap / "orchestrator" / "sweep.py"), "--space", str(tmp_path / "snap.yaml"),
             "--tracking-uri", mlflow_store(tmp_path), "--storage", str(tmp_path / "ray")]
    # The nodes start from this process's environment (no snapshot on their path); only the
    # driver runs from the snapshot.
    script = f"""
import os, subprocess, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "dashboard_port": {free_port()}}})
env = {{**os.environ, "PYTHONPATH": {str(snap)!r}}}
out = subprocess.run({sweep!r} + ["--address", cluster.address], env=env, capture_output=True, text=True,
                     timeout=900, cwd={str(ROOT)!r})
print(out.stdout[-3000:], out.stderr[-3000:])
print("RC", out.returncode, flush=True)
cluster.shutdown()
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=1200)
    assert "RC 0" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    runs = _runs(tmp_path, "snap")
    trial = runs[runs["tags.buarl.role"] == "trial"].iloc[0]
    parent = runs[runs["tags.buarl.role"] == "sweep"].iloc[0]
    assert parent["tags.buarl.code_digest"] == expected
    assert trial["status"] == "FINISHED" and trial["tags.buarl.code_digest"] == expected


def test_a_killed_driver_reuses_the_finished_pretraining_and_forks_equal_a_whole_run(tmp_path):
    """The driver killed once the shared pre-training is on storage and a trial runs: --resume
    reuses that pre-training (it is not made again), and each forked trial ends exactly where
    the same config ends when it pre-trains itself in this process (CPU)."""
    space = {**SPACE, "search": {}, "phantom_fixed": {"pretrain_iters": 4, "iters": 40, "eval_every": 4, "log_every": 4},
             "grid": {"labeled": [2], "switches": [{"url": False, "crl": False}, {"crl_mode": "soft", "tau_l": 0.3}]}}
    cmd, env = _sweep(tmp_path, space, "--threads", "1", name="fork")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if " trial " in line and " started: MLflow run " in line:
            break
    assert any("] done in " in ln and ln.startswith("[pre-training ") for ln in seen), "".join(seen)[-3000:]
    _kill_driver(proc)
    out = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "] reused: " in out.stdout and "] started (labeled=" not in out.stdout, out.stdout[-3000:]
    runs = _runs(tmp_path, "fork")
    kids = runs[(runs["tags.buarl.role"] == "trial") & (runs["status"] == "FINISHED")]
    assert len(kids) == 2 and kids["tags.buarl.pretrained_run"].nunique() == 1
    from buarl.config import validate
    from buarl.train import train
    for _, row in kids.iterrows():
        params = {k.removeprefix("params."): v for k, v in row.items() if k.startswith("params.") and isinstance(v, str)}
        cfg = validate({k: None if v == "None" else v if k == "data_root" else yaml.safe_load(v)
                        for k, v in params.items()})
        whole = train(cfg)
        assert row["metrics.test/dice"] == pytest.approx(whole["dice"], abs=1e-12), row["tags.buarl.grid_point"]
        assert row["metrics.val/best_dice"] == pytest.approx(whole["best_val_dice"], abs=1e-12)


def test_a_failed_pretraining_fails_its_trials_with_its_reason(tmp_path):
    space = {**SPACE, "search": {}, "grid": {"labeled": [2], "switches": [{"lr": 1.0e12}, {"lr": 1.0e12, "crl": False}]},
             "phantom_fixed": {"pretrain_iters": 4, "iters": 4, "eval_every": 4, "log_every": 2}}
    cmd, env = _sweep(tmp_path, space, name="prefail")
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = _runs(tmp_path, "prefail")
    pre = runs[runs["tags.buarl.role"] == "pretrain"]
    kids = runs[runs["tags.buarl.role"] == "trial"]
    assert pre["status"].tolist() == ["FAILED"] and "loss became" in pre.iloc[0]["tags.buarl.stop_reason"]
    assert len(kids) == 2 and set(kids["status"]) == {"FAILED"}
    assert set(kids["tags.buarl.status"]) == {"pre-training failed"}
    assert kids["tags.buarl.stop_reason"].str.contains("loss became").all()
