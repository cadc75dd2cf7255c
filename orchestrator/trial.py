"""One Tune trial = one run of buarl's loop, on one worker or under Ray Train on N.

A trial of several workers (or `runner: train`): the Tune function trainable builds a
`TorchTrainer` named after the Tune trial id (so a restarted trial finds its own checkpoints)
and calls `.fit()`; each worker runs `buarl.train.train`. A one-worker trial runs the loop in
the Tune trial process itself: Ray Train would add a controller, a worker actor and its helper
actors for no DDP to set up. Either way a `RayReporter` is the loop's one seam towards Ray,
reporting through `ray.train` (Train workers) or `ray.tune` (the trial itself).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

import buarl
from buarl import run_folder
from buarl.config import Config, validate
from buarl.data import data_key, load_benchmark
from buarl.errors import TrainingDiverged
from buarl.provenance import source_digest
from buarl.train import Reporter, train
from orchestrator.space import Resources

STATE = "state.pt"
# beside STATE in every checkpoint: its iteration, readable without loading it, and the
# evaluation reported with it (replayed on resume: the driver may have died before logging it)
STEP = "step.json"
# The packages a worker runs: the sweep ships them to every worker (Ray `py_modules`), so a
# cluster's workers run the driver's code, not whatever copy their node has installed.
PACKAGES = (Path(buarl.__file__).resolve().parent, Path(__file__).resolve().parent)


def code_digest() -> str:
    return source_digest(*PACKAGES)


def flat_test_metrics(metrics: dict, prefix: str = "test_") -> dict[str, float]:
    """metrics.json -> flat `test_*` scalars (means and per class) of the best-on-validation
    weights, and `test_last_*` of the last iterate where metrics.json has them."""
    out = {f"{prefix}{k}": float(metrics[k]) for k in ("dice", "jaccard", "hd95", "asd")}
    for name, values in metrics["per_class"].items():
        out.update({f"{prefix}{k}_{name}": float(v) for k, v in values.items()})
    out[f"{prefix}empty_predictions"] = float(metrics["empty_predictions"])
    out[f"{prefix}structures"] = float(metrics["structures"])
    if isinstance(metrics.get("last"), dict):
        out.update(flat_test_metrics(metrics["last"], prefix + "last_"))
    return out


class RayReporter(Reporter):
    """Reports every evaluation with a checkpoint that can resume the run, to Ray Train (`api`
    ray.train, on a Train worker) or to Tune (ray.tune, in a one-worker trial's own process):
    both have report(metrics, checkpoint=), Checkpoint and get_checkpoint()."""

    def __init__(self, cfg: Config, preview_cases: list, api, pretrained: Optional[str] = None):
        import ray.train
        self.api = api
        self.cfg, self.preview_cases = cfg, preview_cases
        # the shared pre-training this trial forked from (its hash): reported with every
        # evaluation, so the driver links the run only when the trial really loaded it
        self.pretrained = pretrained
        self.in_trial = api is not ray.train  # the loop runs in the Tune trial's own process
        self.rank = 0 if self.in_trial else ray.train.get_context().get_world_rank()
        self.scalars: dict[str, float] = {}
        self.state: Optional[dict] = None
        self.resumed_from = 0  # the iteration this worker's loop was restored at (0: a fresh start)
        # the last evaluation, repeated in every log report: Tune's searcher and scheduler read
        # the space's metric from each result
        self.last_eval: dict = {"val_dice": 0.0, "best_val_dice": 0.0}
        self.evaluations = 0
        self.last_report: Optional[dict] = None  # the last evaluation's result, as reported
        self.digest = code_digest()  # reported with every result: which code this worker runs

    def log(self, step: int, scalars: dict) -> None:
        """Every `log_every` iterations: the training scalars as a result of their own (no
        checkpoint), so the run's charts have curves; the driver logs only their train_*
        keys (`report`=0), the evaluation keys ride along for Tune."""
        self.scalars = {f"train_{k}": float(v) for k, v in scalars.items() if isinstance(v, (int, float))}
        self.api.report({**self.last_eval, **self.scalars, "iteration": step, "report": 0,
                               "evaluations": self.evaluations, "done": 0})

    def _report(self, metrics: dict, write: Callable[[Path], None]) -> None:
        if self.rank != 0:  # every rank reports; rank 0 alone writes the checkpoint
            self.api.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            write(Path(d))
            self.api.report(metrics, checkpoint=self.api.Checkpoint.from_directory(d))

    def checkpoint(self, step: int, metrics: dict, state: dict, is_best: bool) -> None:
        self.state = state
        self.evaluations += 1
        self.last_eval = {k: metrics[k] for k in ("val_dice", "best_val_dice")}
        self.last_report = {**self.scalars, **metrics, "done": 0, "code_digest": self.digest, "report": 1,
                            **({"pretrained_from": self.pretrained} if self.pretrained else {}),
                            "evaluations": self.evaluations, "resumed_from": self.resumed_from}
        self._report(self.last_report, lambda folder: write_state(folder, state, self.last_report))

    def restore(self) -> Optional[dict]:
        """The newest readable checkpoint of this run. Tune records a trial's checkpoint in its
        experiment state, saved every ≥10 s and synced asynchronously, so a sweep killed in
        between would resume a trial from an older one (or from iteration 0). A trial run by
        Tune itself therefore takes the checkpoint of the highest iteration in its own storage
        folder, where every checkpoint it reported lies (Tune's among them); a Train worker
        takes Ray Train's, its Train run found by name."""
        known = self.api.get_checkpoint()
        found = {c.path: (step, c) for step, c in own_checkpoints()} if self.in_trial else {}
        if known is not None and known.path not in found:
            found[known.path] = (checkpoint_step(known), known)
        for _, ckpt in sorted(found.values(), key=lambda c: c[0], reverse=True):
            state = load_state(ckpt)
            if state is not None:
                self.resumed_from = int(state["step"])
                self._replay(step_file(ckpt).get("report"))
                return state
        return None

    def _replay(self, report: Optional[dict]) -> None:
        """The restored checkpoint's evaluation, reported once more. The driver logs results
        as it receives them, so one killed between a worker's report and its own handling of
        it never logged that evaluation; a trial restored there (at its end, say) would not
        evaluate it again. The driver keeps one value per step and key (tracking.py), so an
        evaluation it did log is not logged twice."""
        if not report:
            return
        self.evaluations = int(report.get("evaluations", 0))
        self.last_eval = {k: report[k] for k in ("val_dice", "best_val_dice") if k in report}
        self.last_report = {**report, "code_digest": self.digest, "resumed_from": self.resumed_from}
        self.api.report(self.last_report)

    def finish(self, metrics: dict, best_weights: dict) -> None:
        final = {**flat_test_metrics(metrics), "best_val_dice": float(metrics["best_val_dice"]),
                 "iteration": metrics["iterations"],
                 "train_seconds": metrics["train_seconds"], "done": 1, "code_digest": self.digest}

        def write(folder: Path) -> None:
            run_folder.write_final(folder, self.cfg, metrics, best_weights, self.preview_cases)
            if self.state is not None:  # a restart after the end resumes straight to the end
                write_state(folder, self.state, self.last_report)
        self._report(final, write)


def write_state(folder: Path, state: dict, report: Optional[dict] = None) -> None:
    """The loop's state and, beside it, its iteration (read without loading the state) and
    the evaluation `report`ed with it."""
    torch.save(state, folder / STATE)
    (folder / STEP).write_text(json.dumps({"step": int(state["step"]), "report": report}))


def step_file(ckpt) -> dict:
    """A checkpoint's STEP file; {} when it has none (an older checkpoint, or one cut while
    it was written)."""
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{STEP}") as f:
            info = json.loads(f.read())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def checkpoint_step(ckpt) -> int:
    """The iteration a checkpoint holds, from its STEP file; -1 when it has none: tried last."""
    try:
        return int(step_file(ckpt)["step"])
    except (KeyError, TypeError, ValueError):
        return -1


def checkpoints_in(fs, folder: str) -> list:
    """(iteration, Checkpoint) for every checkpoint folder in a trial's folder on a pyarrow
    filesystem (local, NFS, s3: whatever the sweep's --storage is)."""
    import pyarrow.fs
    import ray.tune

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    folders = sorted(i.path for i in infos
                     if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    return [(checkpoint_step(c), c) for c in (ray.tune.Checkpoint(p, filesystem=fs) for p in folders)]


def own_checkpoints() -> list:
    """checkpoints_in this Tune trial's storage folder. Ray's StorageContext is a developer
    API: should a Ray release change it, a trial warns and falls back on Tune's checkpoint."""
    import ray.tune

    try:
        storage = ray.tune.get_context().get_storage()
        fs, folder = storage.storage_filesystem, storage.trial_fs_path
    except Exception as e:  # noqa: BLE001 (any change of a developer API)
        warnings.warn(f"cannot list this trial's checkpoints ({type(e).__name__}: {e}); resuming from Tune's")
        return []
    return checkpoints_in(fs, folder)


def load_state(ckpt) -> Optional[dict]:
    """A checkpoint's loop state; None when it has none or it cannot be read (a checkpoint
    cut while it was copied to storage), with a warning saying which."""
    try:
        with ckpt.as_directory() as d:
            path = Path(d) / STATE
            return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    except Exception as e:  # a truncated file raises whatever the unpickler meets
        warnings.warn(f"checkpoint {ckpt.path} cannot be read ({type(e).__name__}: {e}); trying an older one")
        return None


def trial_data(cfg: Config, shared: Optional[tuple]):
    """The dataset the sweep's driver loaded, when it is this config's (`shared`: its
    data_key and object-store reference); else, e.g. a searched image_size, the trial reads
    the files itself."""
    if shared is not None and shared[0] == data_key(cfg):
        import ray
        return ray.get(shared[1])
    return load_benchmark(cfg)


def shared_start(cfg: Config, pretrained: Optional[dict]) -> tuple[Optional[dict], Optional[str], Optional[str]]:
    """(the state this trial forks from, why it cannot run, the pre-training's hash): the
    sweep's pre-training of this trial's key (orchestrator.pretrainings), found by the hash
    of its settings and this worker's code; all None when there is none (the trial
    pre-trains itself)."""
    from buarl import pretraining
    from orchestrator.pretrainings import hash_of, read_state
    if not pretrained or not pretraining.forks(cfg):
        return None, None, None
    h = hash_of(cfg)
    entry = pretrained.get(h)
    if entry is None:
        return None, None, None
    if "error" in entry:
        return None, entry["error"], h
    path = entry["path"]
    return pretraining.start_state(cfg, read_state(path), path), None, h


def run_loop(cfg: Config, api, wrap: Callable = lambda m: m, shared: Optional[tuple] = None,
             pretrained: Optional[dict] = None) -> None:
    """buarl's loop with a RayReporter on `api` (ray.train or ray.tune), forked from the
    sweep's shared pre-training when it has one for this trial. A diverged trial, or one
    whose pre-training failed, ends early with its reason; it is not retried (it would fail
    again)."""
    data = trial_data(cfg, shared)
    start, failed, forked_from = shared_start(cfg, pretrained)
    if failed:
        api.report({"failed": 1, "stop_reason": failed, "val_dice": 0.0, "best_val_dice": 0.0, "done": 1})
        return
    try:
        train(cfg, RayReporter(cfg, data.val or data.test, api, forked_from), wrap=wrap, data=data, start=start)
    except TrainingDiverged as e:
        api.report({"diverged": 1, "stop_reason": str(e), "val_dice": 0.0, "best_val_dice": 0.0, "done": 1})


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train.torch

    cfg = validate(loop_config["cfg"], source="trial config")
    if cfg.device.startswith("cuda"):
        cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device())})
    world = ray.train.get_context().get_world_size()
    run_loop(cfg, ray.train,
             (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else (lambda m: m),
             loop_config.get("data"))


def run_trial(config: dict, base: dict, storage: str, resources: dict, max_failures: int,
              data: Optional[tuple] = None, pretrained: Optional[dict] = None) -> None:
    """The Tune function trainable: the loop itself (one worker), or one TorchTrainer per
    trial, resumable by its name. `data`: the driver's loaded dataset (trial_data);
    `pretrained`: the sweep's shared pre-trainings (shared_start)."""
    from ray import tune
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    values = {**base, **config}
    if Resources.model_validate(resources).loop_in_trial:
        # the loop in this Tune trial's own process, which holds the trial's CPUs and GPU share
        # (Ray sets CUDA_VISIBLE_DEVICES); Tune keeps its checkpoints and restarts it from the
        # last one after a failure
        return run_loop(validate(values, source="trial config"), tune, shared=data, pretrained=pretrained)
    trial_id = tune.get_context().get_trial_id()
    gpus = resources["gpus_per_worker"]
    worker_res = {"CPU": resources["cpus_per_worker"], **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": values, "data": data},
        scaling_config=ray.train.ScalingConfig(num_workers=resources["workers"], use_gpu=gpus > 0,
                                               resources_per_worker=worker_res),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
