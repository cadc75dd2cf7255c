"""`python orchestrator/sweep.py --space thresholds.yaml`: the product's main job.

parse -> validate the space and flags (exit 2 on any problem, Ray never started) -> plan
-> [--dry-run: print the plan and stop] -> check storage and tracking store -> start or
join Ray -> one Tune study per grid point (Optuna inside, ASHA optional), every trial a
Ray Train run of buarl's loop, logged to MLflow from the driver -> summary.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `python orchestrator/sweep.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buarl.errors import BuarlError  # noqa: E402
from orchestrator.ray_env import (apply_env_defaults, env_while, is_loopback, keep_on_loopback,  # noqa: E402
                                  live_local_cluster, local_cluster_env, worker_runtime_env,
                                  write_bootstrap)
from orchestrator import pretrainings, studies  # noqa: E402
from orchestrator import storage as storage_fs  # noqa: E402
from orchestrator.redaction import redact  # noqa: E402
from orchestrator.names import TAG_DATA, TAG_SYNTHETIC  # noqa: E402
from orchestrator.space import Plan, SpaceError, describe, load_space, make_plan  # noqa: E402


TRAINABLE_MEMORY = 256 * 1024**2  # bytes of Ray's logical memory for a trial's waiting driver


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="buarl-sweep", description="Ray Tune + Optuna sweep of BUARL, tracked in MLflow")
    p.add_argument("--space", required=True, help="a name in search_spaces/ (thresholds, ablation, ...) or a YAML path")
    p.add_argument("--data-root", help="real dataset folder (default: a built-in phantom)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///$PWD/mlflow.db)")
    p.add_argument("--storage", help="Ray results: local dir, NFS path or s3:// URI (default ./ray_results)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto or host:6379); default: start a local one")
    p.add_argument("--name", help="sweep name (default: the space name); the unit --resume continues")
    p.add_argument("--num-samples", type=int, help="Optuna trials per grid point (overrides the space)")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once per grid point")
    p.add_argument("--threads", type=int,
                   help="torch threads per worker (default: this machine's cores / trials at once)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run only the grid points whose name matches (repeatable), e.g. 'labeled=3*'")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB",
                   help="leave out the grid points whose name matches (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--warm-start", metavar="SWEEP",
                   help="start each grid point's Optuna study from the trials of an earlier sweep (same --storage)")
    p.add_argument("--dashboard", action="store_true",
                   help="start the Ray dashboard of a local cluster (127.0.0.1:8265) even when no trial needs it "
                        "(only Ray Train trials do: several workers or runner: train)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit without starting Ray")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra fixed config overrides for every trial")
    return p


def _fail(msg: str) -> int:
    print(f"buarl-sweep: error: {msg}", file=sys.stderr)
    return 2


def storage_dir(args) -> str:
    if args.storage and "://" in args.storage:
        return args.storage
    return str(Path(args.storage or "ray_results").expanduser().resolve())


def check_storage(path: str) -> None:
    from orchestrator.tracking import StorageError
    if "://" in path:
        return  # remote storage: Ray reports problems with credentials and buckets itself
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".buarl-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise StorageError(f"--storage {path}: results folder is not writable ({e.strerror})") from None


def local_resource_problem(space, cpus: int) -> str | None:
    """Why one trial can never start on this machine's local Ray cluster, if it cannot."""
    r = space.resources
    need_cpu = r.workers * r.cpus_per_worker
    if need_cpu > cpus:
        return f"one trial needs {need_cpu:g} CPUs ({r.workers} workers x {r.cpus_per_worker:g}) but this machine has {cpus}"
    if r.gpus_per_worker:
        import torch
        if r.workers * r.gpus_per_worker > torch.cuda.device_count():
            return f"one trial needs {r.workers * r.gpus_per_worker:g} GPUs but this machine has {torch.cuda.device_count()}"
    return None


def prepare(args) -> tuple[Plan, str]:
    if args.num_samples is not None and args.num_samples < 1:
        raise SpaceError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_concurrent < 1:
        raise SpaceError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    space, path = load_space(args.space)
    if args.set:
        space = with_fixed(space, path, args.set)
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    if data_root and not Path(data_root).is_dir():
        raise SpaceError(f"--data-root {args.data_root}: no such folder")
    cpus = os.cpu_count() or 1
    plan = make_plan(space, path, data_root, args.num_samples, args.max_concurrent, cpus)
    problem = None if args.address else local_resource_problem(space, cpus)
    if problem and not args.dry_run:
        raise SpaceError(f"{path}: resources: {problem} (join a cluster with --address)")
    if problem:
        print(f"note: {problem}; this plan needs a cluster (--address)", file=sys.stderr)
    sweep = space.name if args.name is None else args.name
    check_name(sweep, "--name" if args.name is not None else f"{path}: name")
    return select(plan, args), sweep


# A sweep's name is a folder of --storage and a tag in MLflow: one plain path component.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str, where: str) -> None:
    if not PLAIN_NAME.fullmatch(name or ""):
        raise SpaceError(f"{where} {name!r}: a sweep name is one plain folder name (letters, digits, '.', '_', "
                         "'-'; starting with a letter or digit; at most 100 characters)")


def with_fixed(space, path, pairs: list[str]):
    """--set KEY=VALUE fixes a config key for every trial. A key the space searches or grids
    over is refused: the search (or grid) would silently win over the value."""
    from buarl.config import Config, base_values, parse_overrides, validate
    from buarl.errors import ConfigError
    overrides = parse_overrides(pairs)
    grid_keys = {"labeled", "seed"} | {k for sw in space.grid.switches for k in sw}
    for key in overrides:
        if key not in Config.model_fields:
            raise SpaceError(f"--set {key}: unknown parameter (not a buarl config key)")
        if key in space.search:
            raise SpaceError(f"--set {key}: {path} searches {key} (search.{key}); fix it by removing it from "
                             "the space's search, or leave it out of --set")
        if key in grid_keys:
            raise SpaceError(f"--set {key}: {path} sets {key} per grid point (grid); use --only to pick grid "
                             "points, or edit the grid")
    try:
        validate({**base_values(space.base_config), **space.fixed, **overrides}, source="--set")
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    return space.model_copy(update={"fixed": {**space.fixed, **overrides}})


def space_digest(plan: Plan) -> str:
    import hashlib
    return hashlib.sha256(plan.space.model_dump_json().encode()).hexdigest()[:16]


def check_sweep_state(folder: str, sweep: str, plan: Plan, resume: bool) -> None:
    """A new sweep never writes into another's results; --resume continues only this sweep's
    own state (Tune unpickles what it finds there: the folder is trusted input). `folder`:
    local or remote (--storage's filesystem)."""
    shown = redact(folder)
    if not resume:
        if storage_fs.kind(folder) != "none":
            raise SpaceError(f"sweep {sweep!r} already has results in {shown}: "
                             f"add --resume to continue it, or --name NEW for a new sweep")
        return
    if storage_fs.kind(folder) != "dir":
        raise SpaceError(f"--resume: {shown} does not exist: nothing to resume for sweep {sweep!r} "
                         "(check --storage and --name, or drop --resume)")
    state = f"{folder}/buarl_sweep.json"
    if storage_fs.kind(state) != "file":
        raise SpaceError(f"--resume: {shown} holds no buarl_sweep.json, so it is not a buarl sweep's folder "
                         "(Tune would unpickle whatever is there); resume only your own sweeps")
    saved = json.loads(storage_fs.read_bytes(state))
    if saved.get("name") != sweep or saved.get("space_digest") != space_digest(plan):
        raise SpaceError(f"--resume: {shown} was started from another space (or as another sweep: "
                         f"{saved.get('name')!r}); resume it with its own space, or start anew with --name NEW")
    planned = saved.get("trials_per_point")
    if planned is not None and planned != plan.trials_per_point:
        raise SpaceError(f"--resume: sweep {sweep!r} was planned with {planned} trial(s) per grid point, not "
                         f"{plan.trials_per_point}: a sweep does not grow on --resume. Continue its search in a "
                         f"new sweep: --name NEW --warm-start {sweep} --num-samples N")


def write_sweep_state(folder: str, sweep: str, plan: Plan) -> None:
    state = f"{folder}/buarl_sweep.json"
    if storage_fs.kind(state) == "none":
        storage_fs.write_bytes(state, (json.dumps(
            {"name": sweep, "space_digest": space_digest(plan), "space_file": plan.space_file,
             "trials_per_point": plan.trials_per_point}, indent=2) + "\n").encode())


def check_data(plan: Plan) -> dict:
    """The dataset checks of `buarl train`, once per distinct data setting of the grid,
    before Ray starts: a broken file is one line naming it, not a sweep of failed trials.
    Returns grid point name -> (data_key, what the check loaded), points of one setting
    sharing one load: the trials get it (share_data) rather than reading the files again."""
    from buarl.config import validate
    from buarl.data import data_key, load_benchmark
    from orchestrator.space import with_probe
    loaded, by_point = {}, {}
    start = time.time()
    for point in plan.points:
        cfg = validate(with_probe({**plan.base, **point.values}, plan.space.search), source=f"grid point {point.name}")
        key = data_key(cfg)
        if key not in loaded:
            loaded[key] = load_benchmark(cfg)
        by_point[point.name] = (key, loaded[key])
    print(f"data: {len(loaded)} setting(s) checked and loaded in {time.time() - start:.1f} s; "
          "the trials share them through Ray's object store", flush=True)
    return by_point


def share_data(by_point: dict) -> dict:
    """check_data's result with each distinct dataset put in the object store once: grid
    point name -> (data_key, reference), which its trials fetch (trial.trial_data). The
    driver holds the references, so the datasets stay there while the sweep runs."""
    import ray
    refs: dict = {}
    for key, data in by_point.values():
        if key not in refs:
            refs[key] = ray.put(data)
    return {name: (key, refs[key]) for name, (key, _) in by_point.items()}


def select(plan: Plan, args) -> Plan:
    """Apply --only / --skip / --threads: part of a grid, e.g. one seed per machine or sweep."""
    if args.threads is not None and args.threads < 1:
        raise SpaceError(f"--threads must be >= 1, got {args.threads}")
    points = [p for p in plan.points
              if (not args.only or any(fnmatch.fnmatchcase(p.name, g) for g in args.only))
              and not any(fnmatch.fnmatchcase(p.name, g) for g in args.skip)]
    if not points:
        names = ", ".join(p.name for p in plan.points)
        raise SpaceError(f"--only {args.only} --skip {args.skip} leave no grid point of {plan.space_file} "
                         f"(its points: {names})")
    return plan.model_copy(update={"points": points,
                                   "threads_per_worker": args.threads or plan.threads_per_worker})


def free_port(preferred: int = 5000) -> int:
    """MLflow's default port if it is free on 127.0.0.1, else one the OS picks."""
    import socket
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    return preferred


def param_space(plan: Plan) -> dict:
    from ray import tune
    from orchestrator.space import Categorical, IntRange, LogUniform, Uniform
    out = {}
    for key, d in plan.space.search.items():
        if isinstance(d, Uniform):
            out[key] = tune.uniform(d.low, d.high)
        elif isinstance(d, LogUniform):
            out[key] = tune.loguniform(d.low, d.high)
        elif isinstance(d, IntRange):
            out[key] = tune.randint(d.low, d.high + 1) if d.step == 1 else tune.qrandint(d.low, d.high, d.step)
        elif isinstance(d, Categorical):
            out[key] = tune.choice(d.choices)
    return out


def progress_reporter(plan: Plan):
    from ray.tune import CLIReporter
    return CLIReporter(metric_columns={"iteration": "iter", "val_dice": "val Dice", "best_val_dice": "best val",
                                       "test_dice": "test Dice"},
                       parameter_columns=list(plan.space.search), max_report_frequency=30,
                       print_intermediate_tables=True, sort_by_metric=False)


def run_point(plan: Plan, point, sweep: str, storage: str, client, exp_id: str, parent_id: str, resume: bool,
              digest: str, data: Optional[tuple] = None, pretrained: Optional[tuple] = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.optuna_search import StudyTruthOptunaSearch
    from orchestrator.tracking import MlflowTrials
    from orchestrator.trial import run_trial

    s, r = plan.space, plan.space.resources
    base = {**plan.base, **point.values, "threads": plan.threads_per_worker}
    done, runs = pretrained or ({}, {})
    trainable = tune.with_parameters(run_trial, base=base, storage=f"{storage}/{sweep}/train",
                                     resources=r.model_dump(), max_failures=s.max_failures, data=data,
                                     pretrained=done)
    if r.loop_in_trial:  # the trial runs the loop: it holds the worker's CPUs and GPU share
        trainable = tune.with_resources(trainable, {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker})
    else:
        # The trainable only waits on its TorchTrainer, whose workers hold the trial's CPUs/GPUs;
        # Tune's default 1 CPU for it would halve how many trials fit on a small machine. A
        # placement group needs some resource: the waiting process's memory is the true one.
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRAINABLE_MEMORY})
    callback = MlflowTrials(client, exp_id, parent_id, sweep, point.name, base, digest=digest, pretrained_runs=runs,
                            row=point.row, data=data_origin(plan))
    path = f"{storage}/{sweep}/{point.name}"
    run_config = tune.RunConfig(name=point.name, storage_path=f"{storage}/{sweep}", callbacks=[callback],
                                progress_reporter=progress_reporter(plan), verbose=1,
                                # a trial lost with its node restarts: from Tune's last checkpoint (one
                                # worker) or its Train run resumes by name
                                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    if resume and tune.Tuner.can_restore(path):
        print(f"[{point.name}] resuming from {redact(path)}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(plan) or None)
    else:
        search = None
        if s.search:
            # Each study gets its own reproducible sampler seed (grid points sharing a run seed
            # would otherwise propose identical hyperparameters).
            seed = zlib.crc32(f"{sweep}/{point.name}".encode()) % 2**31
            # The study lives in the sweep's optuna.db (optuna-dashboard, --warm-start), one per grid point.
            url = studies.storage_url(f"{storage}/{sweep}")
            optuna_kwargs = {"storage": studies.rdb(url), "study_name": point.name} if url else {}
            search = ConcurrencyLimiter(StudyTruthOptunaSearch(metric=s.metric, mode=s.mode, seed=seed,
                                                               run_ids=callback.runs, **optuna_kwargs),
                                        plan.max_concurrent)
        # Rungs count evaluations (results also arrive at every log step); trials end by
        # their own schedule, never at ASHA's default max_t of 100.
        scheduler = ASHAScheduler(time_attr="evaluations", max_t=10 ** 9, grace_period=s.scheduler.grace_period,
                                  reduction_factor=s.scheduler.reduction_factor) if s.scheduler else None
        tuner = tune.Tuner(
            trainable, param_space=param_space(plan),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search, scheduler=scheduler,
                                        num_samples=plan.trials_per_point,
                                        max_concurrent_trials=None if search else plan.max_concurrent),
            run_config=run_config)
    return tuner.fit()


def summarise(results: dict, plan: Plan, sweep: str, storage: str, tracking_uri: str) -> tuple[str, dict]:
    lines = ["", f"sweep {sweep}: best configuration per grid point ({plan.space.metric}, {plan.space.mode})"]
    best_rows = {}
    for name, grid in results.items():
        try:
            best = grid.get_best_result(metric=plan.space.metric, mode=plan.space.mode, filter_nan_and_inf=True)
        except RuntimeError:
            lines.append(f"  {name}: no finished trial")
            continue
        m = best.metrics or {}
        params = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (best.config or {}).items()}
        best_rows[name] = {"params": params, plan.space.metric: m.get(plan.space.metric),
                           "test_dice": m.get("test_dice"), "trial_id": m.get("trial_id")}
        test = f", test Dice {m['test_dice']:.4f}" if isinstance(m.get("test_dice"), float) else ""
        lines.append(f"  {name}: {plan.space.metric}={m.get(plan.space.metric, float('nan')):.4f}{test} {params}")
    lines += ["", f"Ray results:  {storage}/{sweep}",
              f"MLflow:       {tracking_uri}  (experiment '{plan.space.name}', parent run '{sweep}')",
              f"Compare runs: {command('mlflow')} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 "
              f"--port {free_port()}",
              f"Tables:       {command('buarl-tables')} --experiment {plan.space.name} --tracking-uri {tracking_uri}"]
    url = studies.storage_url(f"{storage}/{sweep}")
    if plan.space.search and url:
        lines.append(f"Studies:      {command('optuna-dashboard')} --host 127.0.0.1 {url}   (continue the search "
                     f"with --name NEW --warm-start {sweep})")
    return "\n".join(lines), best_rows


def log_outcome(client, parent: str, best: dict, metric: str, mode: str = "max") -> None:
    """The sweep's result on its parent run, so the runs table and charts show it without
    expanding the trials: per grid point its best trial's metric and test Dice (a chart
    section per point: MLflow groups metrics by the part before "/"), the best trial's run
    and config as a tag, and all of it as best_per_grid_point.json."""
    from mlflow.entities import Metric
    from orchestrator.names import TAG_TRIAL
    now, metrics = int(time.time() * 1000), []
    for point, row in best.items():
        section = re.sub(r"[^A-Za-z0-9_.\- ]", "-", point)  # MLflow keys take no "="
        for key in (metric, "test_dice"):
            if isinstance(row.get(key), (int, float)):
                metrics.append(Metric(f"{section}/{key}", float(row[key]), now, 0))
        found = client.search_runs([client.get_run(parent).info.experiment_id],
                                   f"tags.{TAG_TRIAL} = '{row.get('trial_id')}' and "
                                   f"tags.mlflow.parentRunId = '{parent}'", max_results=1)
        row["run_id"] = found[0].info.run_id if found else None
        client.set_tag(parent, f"buarl.best.{section}", json.dumps(
            {"run_id": row["run_id"], "trial_id": row.get("trial_id"), "params": row["params"]}, default=str)[:5000])
    ranked = [r for r in best.values() if isinstance(r.get(metric), (int, float))]
    if ranked:  # the best over every grid point: one number for the runs table
        top = (max if mode == "max" else min)(ranked, key=lambda r: r[metric])
        metrics.append(Metric(f"best/{metric}", float(top[metric]), now, 0))
        if isinstance(top.get("test_dice"), (int, float)):
            metrics.append(Metric("best/test_dice", float(top["test_dice"]), now, 0))
    if metrics:
        client.log_batch(parent, metrics=metrics)
    client.log_text(parent, json.dumps(best, indent=2, default=str), "best_per_grid_point.json")


def command(name: str) -> str:
    """A console script of this sweep's environment as a shell can run it without that
    environment active: its path (relative under the working folder, as `.venv/bin/mlflow`)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Refused(BuarlError):
    """The sweep cannot start here as asked (one line for the user, exit 2)."""


def locate_data(plan: Plan) -> dict:
    """The phantom's folder when no --data-root is given; then the dataset's own checks,
    in the driver, before Ray starts (returns the data they loaded)."""
    if plan.phantom:
        from buarl.config import Config
        from buarl.data import resolve_root
        root = resolve_root(Config(**{k: v for k, v in plan.base.items() if k != "data_root"}))
        plan.base["data_root"] = str(root)
        print(f"no --data-root: running on the built-in phantom at {root}\n"
              f"  (point at real data with --data-root, e.g. --data-root ../shared/data/ACDC)", flush=True)
    return check_data(plan)


def open_outputs(args, plan: Plan, sweep: str):
    """The results folder and the tracking store, checked before anything is written, and
    this machine free of another local cluster; then the sweep's own state is recorded."""
    from orchestrator.tracking import default_tracking_uri, open_store
    tracking_uri = args.tracking_uri or default_tracking_uri()
    storage = storage_dir(args)
    check_storage(storage)
    if not args.address:  # first: while another sweep runs, its folder is no reason to --resume
        other = live_local_cluster()
        if other:
            raise Refused(f"another Ray cluster is running on this machine ({other}), most likely another sweep. "
                          "Two local clusters on one machine take each other's bootstrap address and their "
                          "trials stall. Wait for it to end, or share one cluster: `ray start --head` once, "
                          "then start every sweep with --address auto")
    if not args.resume and args.name is None and storage_fs.kind(f"{storage}/{sweep}") != "none":
        taken = sweep
        sweep = fresh_name(storage, sweep)
        print(f"sweep {taken!r} already has results in {redact(storage)}: this one is {sweep!r} "
              f"(continue {taken!r} with --resume; name a sweep with --name)", flush=True)
    check_sweep_state(f"{storage}/{sweep}", sweep, plan, args.resume)
    client = open_store(tracking_uri)
    if args.warm_start:
        if not plan.space.search:
            raise Refused(f"--warm-start: {plan.space_file} has no search, so no Optuna study to continue")
        if "://" in storage:
            raise Refused(f"--warm-start needs a local --storage (the studies live there), not {redact(storage)}")
        studies.check_warm_start(Path(storage) / args.warm_start, args.warm_start)
    write_sweep_state(f"{storage}/{sweep}", sweep, plan)
    if "://" not in storage:
        if args.warm_start and not args.resume:
            copied = studies.warm_start(Path(storage) / args.warm_start, studies.storage_url(f"{storage}/{sweep}"),
                                        [p.name for p in plan.points])
            for point, n in copied.items():
                print(f"[{point}] Optuna study warm-started with {n} finished trial(s) of sweep {args.warm_start!r}",
                      flush=True)
    return tracking_uri, storage, client, sweep


def fresh_name(storage: str, sweep: str) -> str:
    """`NAME-2`, `NAME-3`, ...: the first that has no folder in the storage yet."""
    n = 2
    while storage_fs.kind(f"{storage}/{sweep}-{n}") != "none":
        n += 1
    return f"{sweep}-{n}"


def start_ray(args, plan: Plan, loaded: dict) -> tuple[str, dict]:
    """Join the given cluster or start a local one, and put the data the checks loaded in
    its object store; returns the digest of the code the workers run and share_data's result."""
    apply_env_defaults()
    loopback = not args.address and keep_on_loopback()  # (main set it before Ray was imported)
    import ray
    from orchestrator.trial import PACKAGES, code_digest
    runtime_env = worker_runtime_env(PACKAGES)
    if args.address:
        with neutral_cwd():
            ray.init(address=args.address, log_to_driver=False, runtime_env=runtime_env)
        total = ray.cluster_resources()
        r = plan.space.resources
        for kind, need in (("CPU", r.workers * r.cpus_per_worker), ("GPU", r.workers * r.gpus_per_worker)):
            if need > total.get(kind, 0):
                raise Refused(f"{plan.space_file}: resources: one trial needs {need:g} {kind}s but the cluster at "
                              f"{args.address} offers {total.get(kind, 0):g}")
    else:
        # The dashboard (bound to 127.0.0.1) serves the State API that Ray Train uses to
        # clean up placement groups; without it a finished Train trial spins on errors. Trials
        # that run their loop themselves never need it, and it costs CPU throughout
        # (BENCHMARKS.md, G6).
        dashboard = args.dashboard or not plan.space.resources.loop_in_trial
        with env_while(local_cluster_env(dashboard)), neutral_cwd():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard,
                     dashboard_host="127.0.0.1", log_to_driver=False, runtime_env=runtime_env)
        write_bootstrap(ray.get_runtime_context().gcs_address)
        if not (loopback and is_loopback(ray.util.get_node_ip_address())):
            print(f"buarl-sweep: warning: the local Ray cluster listens beyond loopback (node address "
                  f"{ray.util.get_node_ip_address()}): Ray was imported before the sweep could keep it "
                  f"local (docs/reliability.md)", file=sys.stderr)
    return code_digest(), share_data(loaded)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A cluster address that answers, or one line: Ray itself retries an unreachable GCS for
    minutes, printing only connection warnings. `auto` is the machine's bootstrap file's
    address; a `ray://` client address is left to Ray."""
    import socket
    if address.startswith("ray://"):
        return
    target = live_local_cluster() if address == "auto" else address
    if target is None:
        raise Refused("--address auto: no Ray cluster runs on this machine (start one with `ray start --head`, "
                      "or leave out --address for a local one)")
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except ValueError:
        raise Refused(f"--address {address}: expected host:port, auto or ray://host:port") from None
    except OSError as e:
        raise Refused(f"--address {address}: no Ray cluster answers at {target} ({e.strerror or e})") from None


@contextlib.contextmanager
def neutral_cwd():
    """ray.init puts the driver's working directory on every worker's sys.path, ahead of the
    packages the sweep ships (py_modules). Started from a checkout, workers would import that
    checkout's files as they are when each worker starts, edits made during the sweep included,
    not the code the sweep started from. Ray takes the folder at init: "/" holds no package."""
    here = os.getcwd()
    os.chdir("/")
    try:
        yield
    finally:
        os.chdir(here)


def open_parent_run(args, plan: Plan, sweep: str, client, storage: str, tracking_uri: str,
                    digest: str) -> tuple[str, str]:
    """The experiment and the sweep's parent run, with its provenance tags; on --resume the
    trial runs a killed driver left RUNNING are marked KILLED."""
    from buarl.provenance import code_version, git_commit
    from orchestrator.tracking import experiment, mark_orphans, parent_run
    exp_id = experiment(client, plan.space.name, tracking_uri)
    parent = parent_run(client, exp_id, sweep, args.resume,
                        {"space": plan.space_file, "data_root": plan.base.get("data_root"), "storage": storage,
                         "command": " ".join(sys.argv), "metric": plan.space.metric, "mode": plan.space.mode,
                         **{f"fixed.{k}": v for k, v in plan.space.fixed.items()}})
    if args.resume:
        n = mark_orphans(client, exp_id, parent)
        if n:
            print(f"marked {n} orphaned RUNNING trial run(s) KILLED (their trials resume into them)", flush=True)
    client.set_tag(parent, "buarl.code_version", code_version())
    commit = git_commit()
    if commit:  # MLflow's own provenance tag: the UI links runs to the source revision
        client.set_tag(parent, "mlflow.source.git.commit", commit)
    client.set_tag(parent, "buarl.code_digest", digest)
    data = data_origin(plan)
    client.set_tag(parent, TAG_DATA, data["name"])
    client.set_tag(parent, TAG_SYNTHETIC, str(data["synthetic"]).lower())
    return exp_id, parent


def data_origin(plan: Plan) -> dict:
    """What the sweep's trials train on (buarl.data.origin): its name says "phantom" for the
    built-in synthetic data, on every run, model and table made from it."""
    from buarl.config import validate
    from buarl.data import origin
    return origin(validate(dict(plan.base), source="sweep config"))


def run_grid(args, plan: Plan, sweep: str, storage: str, client, exp_id: str, parent: str,
             digest: str, shared: dict) -> Optional[dict]:
    """Every grid point in turn; the parent run ends FINISHED, KILLED (Ctrl-C: returns None)
    or FAILED (a grid point raised), after the trials' MLflow models are exported."""
    from orchestrator.tracking import close_model_exports
    results, status = {}, "FINISHED"
    try:
        keys, forked, _ = pretrainings.plan(plan)
        if args.resume:
            from orchestrator.tracking import finished_points
            finished = finished_points(client, exp_id, parent, plan.trials_per_point)
            needed = {h for point, h in forked.items() if point not in finished}
            for h in sorted(set(keys) - needed):
                print(f"[pre-training {h}] not needed: the trials of its grid points all finished", flush=True)
            keys = {h: v for h, v in keys.items() if h in needed}
        pretrained = ({}, {})
        if keys:
            print(f"\n=== shared pre-training: {len(keys)} ===", flush=True)
            pretrained = pretrainings.run_all(keys, storage, sweep, shared, forked, plan.space.resources,
                                              client, exp_id, parent)
        for point in plan.points:
            print(f"\n=== grid point {point.name} ===", flush=True)
            results[point.name] = run_point(plan, point, sweep, storage, client, exp_id, parent, args.resume, digest,
                                            shared.get(point.name), pretrained if point.name in forked else None)
    except KeyboardInterrupt:
        status = "KILLED"
        print("\ninterrupted: continue with the same command plus --resume", file=sys.stderr)
        return None
    except BaseException as e:
        status = "FAILED"  # a grid point that raised leaves no FINISHED sweep behind
        if cluster_failure(e):
            raise ClusterLost(
                f"the Ray cluster failed under this sweep ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "On a machine whose cores are taken by other work, Ray's own processes can miss their "
                "heartbeats and die. Finished trials and the running trials' checkpoints are kept: rerun "
                "the same command with --resume once the machine is free (or with a lower --max-concurrent)"
            ) from e
        raise
    finally:
        close_model_exports(cancel=status == "KILLED")
        client.set_terminated(parent, status=status)
    return results


class ClusterLost(BuarlError):
    """The cluster itself failed (not a trial): the sweep stops with a message, exit 1."""


def cluster_failure(e: BaseException) -> bool:
    """Ray's own processes died or stopped answering (as opposed to a trial's error)."""
    import ray.exceptions as rx
    return isinstance(e, (rx.RaySystemError, rx.LocalRayletDiedError, rx.NodeDiedError, rx.GetTimeoutError,
                          ConnectionError))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.address:
        keep_on_loopback()  # before anything imports Ray: it reads the switch once
    try:
        plan, sweep = prepare(args)
        print("\n".join([describe(plan), *pretrainings.describe(*pretrainings.plan(plan),
                                                                 plan.trials_per_point)]), flush=True)
        loaded = locate_data(plan)  # a dry run checks the data too: a broken file is found now
        if args.dry_run:
            return 0
        if args.address:  # before anything is written: a refused sweep can be rerun as it was
            check_reachable(args.address)
        tracking_uri, storage, client, sweep = open_outputs(args, plan, sweep)
        digest, shared = start_ray(args, plan, loaded)
        del loaded  # the object store holds it now
    except BuarlError as e:
        return _fail(str(e))
    exp_id, parent = open_parent_run(args, plan, sweep, client, storage, tracking_uri, digest)
    started = time.time()
    try:
        results = run_grid(args, plan, sweep, storage, client, exp_id, parent, digest, shared)
    except ClusterLost as e:
        print(f"buarl-sweep: {e}", file=sys.stderr)
        return 1
    if results is None:
        return 130
    text, best = summarise(results, plan, sweep, redact(storage), redact(tracking_uri))
    log_outcome(client, parent, best, plan.space.metric, plan.space.mode)
    print(text + f"\n(done in {time.time() - started:.0f} s)")
    return 0


def cli() -> None:
    """`buarl-sweep` and `python orchestrator/sweep.py`: main(), then a quick exit. Python's
    own finalization would tear down the thousands of modules the driver imported (torch,
    Ray, MLflow), seconds of a sweep's wall for nothing. By then only the exit handlers are
    left to run (Ray's shutdown, logging's flush, finalizers of temporary folders): they run,
    then the process leaves. An uncaught exception takes the normal way out, traceback and all."""
    import atexit
    import threading
    code = main()
    for thread in threading.enumerate():  # what the interpreter's own exit would wait for
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own: what Py_Finalize would run next
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing left to tell it
            pass
    os._exit(code)


if __name__ == "__main__":
    cli()
