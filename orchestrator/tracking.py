"""MLflow: one experiment per space, one parent run per sweep, one child run per trial.

Everything is logged from the driver (a Tune callback), never from workers: concurrent
sqlite writers lock each other, and a worker on another node cannot reach a local store.
A trial that restarts (driver lost, `--resume`) logs into its own earlier run again, so
each trial has exactly one run with one continuous metric history. A run already FINISHED
is final: Tune saves its experiment state every few seconds, so a driver lost just after a
trial ended can leave that trial unfinished in the saved state, and `--resume` replays it
(straight to the end, from its last checkpoint); the replay must not reopen or re-log it.
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from buarl import run_folder
from buarl.errors import BuarlError
from orchestrator.names import (TAG_DATA, TAG_DIGEST, TAG_POINT, TAG_ROW, TAG_SWEEP,  # noqa: F401 (re-exported)
                             TAG_CASES, TAG_SYNTHETIC, TAG_TRIAL, mlflow_key, result_key)
from orchestrator.redaction import redact  # noqa: F401 (re-exported)


class StorageError(BuarlError):
    pass


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def open_store(tracking_uri: str):
    """An MlflowClient that answers, or one clear StorageError (before any training)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise StorageError(f"--tracking-uri {tracking_uri}: folder {db.parent} does not exist")
        probe = db.parent / f".buarl-write-probe-{time.time_ns()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise StorageError(f"--tracking-uri {tracking_uri}: folder {db.parent} is not writable ({e.strerror})") from None
    # Fail fast on an unreachable server instead of MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with _creation_lock(tracking_uri):
            client = MlflowClient(tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as e:  # any failure to reach the store is a user-facing storage problem
        raise StorageError(f"--tracking-uri {redact(tracking_uri)}: tracking store is unreachable "
                           f"({type(e).__name__}: {redact(str(e).splitlines()[0])[:200]})") from None
    global _client
    _client = client
    return client


# The driver's client (open_store's): Tune pickles its callbacks into the storage folder,
# and a client holds its tracking URI with any credentials in it, so MlflowTrials pickles
# without its client and takes this process's own when Tune unpickles it (--resume).
_client = None


@contextmanager
def _creation_lock(tracking_uri: str):
    """MLflow creates (migrates) a new sqlite store at its first query; two sweeps started at
    once on one new store both migrate it and one fails (alembic: "expected to match one row").
    A file lock beside the database lets the first create it and the second find it made."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl
    lock = Path(tracking_uri.removeprefix("sqlite:///")).with_suffix(".lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def artifact_root(tracking_uri: str) -> Optional[str]:
    """Experiments get an absolute artifact location next to a sqlite store."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(tracking_uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def parent_run(client, experiment_id: str, sweep: str, resume: bool, params: dict) -> str:
    """The sweep's parent run: found again on --resume, else created."""
    if resume:
        found = client.search_runs([experiment_id], f"tags.{TAG_SWEEP} = '{sweep}' and tags.buarl.role = 'sweep'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    run = client.create_run(experiment_id, run_name=sweep, tags={TAG_SWEEP: sweep, "buarl.role": "sweep"})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, redact(v)[:6000])
    return run.info.run_id


def mark_orphans(client, experiment_id: str, parent_id: str) -> int:
    """Runs left RUNNING by a lost driver are marked KILLED (a resumed trial reopens its own)."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                              "attributes.status = 'RUNNING'")
    for r in runs:
        client.set_terminated(r.info.run_id, status="KILLED")
        client.set_tag(r.info.run_id, "buarl.note", "driver lost; marked KILLED on resume")
    return len(runs)


def finished_points(client, experiment_id: str, parent_id: str, trials_per_point: int) -> set[str]:
    """Grid points with `trials_per_point` FINISHED trials under the sweep's parent run (an
    earlier run of a resumed sweep): Tune starts none of their trials again."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                              "tags.buarl.role = 'trial' and attributes.status = 'FINISHED'")
    done = collections.Counter(r.data.tags.get(TAG_POINT) for r in runs)
    return {point for point, n in done.items() if n >= trials_per_point}


def _numeric(result: dict) -> dict[str, float]:
    skip = {"done", "report", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
            "iterations_since_restore", "time_since_restore", "timesteps_total", "episodes_total"}
    return {k: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def resolved_params(values: dict) -> dict:
    """Every key of the trial's resolved config that the run reads (defaults included), so
    that a search such as `params.ema_decay = '0.99'` finds runs that never set it; keys of
    the other dataset or of another base are left out (Config.inapplicable)."""
    from buarl.config import validate
    from buarl.errors import ConfigError
    try:
        cfg = validate(values, source="trial config")
    except ConfigError:  # the trial itself reports why; log what was given
        return values
    skip = cfg.inapplicable()
    return {k: v for k, v in cfg.to_dict().items() if k not in skip}


def copy_checkpoint(path: str, dest: Path) -> Path:
    """The files of a Ray checkpoint path (local folder, NFS or a remote URI) in `dest`."""
    local = Path(path)
    if local.is_dir():
        return local
    import pyarrow.fs as pafs
    fs, rel = pafs.FileSystem.from_uri(path)
    pafs.copy_files(rel, str(dest), source_filesystem=fs)
    return dest


def export_pytorch_model(client, run_id: str, obj: dict, source: Path) -> None:
    """A trial's best weights (`obj`, read from `source`) as an MLflow logged model of its run
    (MLflow's own format, named `model`, an output of the run: the UI's Models column links
    it), so that `mlflow models` tooling works. pt2 (torch.export) rather than pickle: loading
    it runs no pickled code. A failure here costs the trial nothing: it is reported, the run
    keeps best.pt."""
    import mlflow.pytorch
    import numpy as np
    from mlflow.entities import LoggedModelOutput

    from buarl.checkpoint import config_of
    from buarl.nets import build
    try:
        cfg = config_of(obj, source)
        model = build(cfg.dataset, cfg.num_classes, cfg.in_channels)
        model.load_state_dict(obj["weights"])
        size = [cfg.image_size] * 2 if cfg.dataset == "acdc" else cfg.patch_size
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_model(model.eval(), f"{tmp}/model", serialization_format="pt2",
                                      pip_requirements=["torch"],
                                      input_example=np.zeros([2, 1, *size], np.float32))  # batch 2: not fixed to 1
            run = client.get_run(run_id)
            logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                                model_type="pytorch",
                                                tags={TAG_DATA: run.data.tags.get(TAG_DATA, ""),
                                                      TAG_POINT: run.data.tags.get(TAG_POINT, "")})
            client.log_model_artifacts(logged.model_id, f"{tmp}/model")
            client.finalize_logged_model(logged.model_id, "READY")
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(obj.get("step", 0) or 0))])
    except Exception as e:
        print(f"WARNING: run {run_id}: MLflow model not logged ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
              flush=True)


class ModelExports:
    """The trials' MLflow models, exported one after another in a background thread of the
    driver (one queue per process: `model_exports()`). torch.export takes seconds of CPU;
    inline, it held up Tune's loop, so the next trial started only after it. The callback
    still ends each trial's run at once (FINISHED, with its other artifacts): a driver lost
    before the export leaves a run without its `model`, as a failed export does. `close()`
    waits for the queue before the sweep ends."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-model")
        self.futures: list = []

    def submit(self, client, run_id: str, obj: dict, source: Path) -> None:
        self.futures.append(self.pool.submit(export_pytorch_model, client, run_id, obj, source))

    def close(self, cancel: bool = False) -> None:
        """Wait for the queued exports; `cancel` (an interrupted sweep) drops those not started."""
        left = sum(not f.done() for f in self.futures)
        if left and not cancel:
            print(f"waiting for {left} trial model export(s) to MLflow", flush=True)
        skipped = sum(f.cancel() for f in self.futures) if cancel else 0
        self.pool.shutdown(wait=True)
        if skipped:
            print(f"{skipped} trial model export(s) to MLflow skipped (interrupted); "
                  "their runs keep best.pt", flush=True)


# Tune pickles its callbacks into the grid point's tuner.pkl, and on --resume runs the unpickled
# copy: a callback cannot hold the thread, so the queue lives here, one per driver process.
_exports: Optional[ModelExports] = None


def model_exports() -> ModelExports:
    global _exports
    if _exports is None:
        _exports = ModelExports()
    return _exports


def close_model_exports(cancel: bool = False) -> None:
    """ModelExports.close on this process's queue, if it has one."""
    global _exports
    if _exports is not None:
        _exports.close(cancel)
        _exports = None


def dataset_input(data: dict):
    """What a trial trained on (buarl.data.origin) as an MLflow dataset input: the runs
    table's Dataset column shows its name and digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    dataset = Dataset(name=data["name"], digest=data.get("digest") or "unknown", source_type="local",
                      source=json.dumps({"uri": redact(data.get("root", ""))}),
                      profile=json.dumps({"synthetic": bool(data.get("synthetic"))}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


class MlflowTrials(Callback):
    """Driver-side Tune callback: a child run per trial with params, curves and artifacts."""

    def __init__(self, client, experiment_id: str, parent_id: str, sweep: str, point: str, base: dict,
                 digest: Optional[str] = None, pretrained_runs: Optional[dict] = None, row: Optional[str] = None,
                 data: Optional[dict] = None):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.data = data or {}  # what the trials train on (buarl.data.origin)
        # shared pre-training hash -> its MLflow run: a forked trial's run links to it
        self.pretrained_runs = pretrained_runs or {}
        self.linked: set[str] = set()  # trials whose run is tagged with its pre-training
        self.row = row
        self.sweep, self.point, self.base, self.digest = sweep, point, base, digest
        self.runs: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        self.settled: set[str] = set()  # trials whose run was FINISHED before this driver saw them
        # per trial: the last step logged and the keys logged at it. A worker restored from
        # its last checkpoint replays the evaluations after it (identically: the RNG streams
        # are restored); the run keeps one value per step and key.
        self.logged: dict[str, tuple[int, set[str]]] = {}

    def __getstate__(self) -> dict:
        """Pickled (Tune's tuner.pkl, on storage) without the client: no tracking URI, so no
        credentials, at rest."""
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("linked", set())  # pickled by a sweep started before the set
        self.__dict__.setdefault("data", {})
        self.client = _client  # the sweep opens its store before Tune restores a grid point

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id], f"tags.{TAG_TRIAL} = '{trial.trial_id}' and "
            f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=1)
        if found and found[0].info.status == "FINISHED":
            run_id = found[0].info.run_id
            self.settled.add(trial.trial_id)
            print(f"[{self.point}] trial {trial.trial_id} already finished (run {run_id}); "
                  "Tune replays it from its last checkpoint, MLflow keeps the recorded result", flush=True)
        elif found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.logged[trial.trial_id] = self._last_logged(run_id, found[0].data.metrics)
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=self.run_name(trial.trial_id, trial.config),
                tags={"mlflow.parentRunId": self.parent_id, TAG_TRIAL: trial.trial_id,
                      TAG_SWEEP: self.sweep, TAG_POINT: self.point, "buarl.role": "trial",
                      **({TAG_ROW: self.row} if self.row else {}),
                      **({TAG_DATA: self.data["name"], TAG_SYNTHETIC: str(self.data["synthetic"]).lower(),
                          TAG_CASES: str(self.data.get("train_cases") or "")} if self.data else {})})
            run_id = run.info.run_id
            params = resolved_params({**self.base, **trial.config})
            from mlflow.entities import Param
            self.client.log_batch(run_id, params=[Param(k, redact(v)[:6000]) for k, v in sorted(params.items())])
            if self.data:
                self.client.log_inputs(run_id, datasets=[dataset_input(self.data)])
        self.runs[trial.trial_id] = run_id
        return run_id

    def run_name(self, trial_id: str, config: dict) -> str:
        """What tells a trial from its siblings, first (the UI cuts long names): its number in
        the grid point and its searched values; a trial of a search-free point is the point.
        The grid point stays in the tags."""
        number = trial_id.rsplit("_", 1)[-1].lstrip("0") or "0"
        searched = {k: v for k, v in config.items() if k not in self.base or self.base[k] != v}
        if not searched:
            return self.point
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(searched.items()))
        return f"#{number} {shown}"

    def _last_logged(self, run_id: str, keys) -> tuple[int, set[str]]:
        """What a run reopened by --resume already holds: its last step and the result keys at
        it (`keys`: its MLflow keys, of either naming, names.result_key)."""
        last, at_last = -1, set()
        for key in keys:
            steps = [m.step for m in self.client.get_metric_history(run_id, key)]
            top = max(steps, default=-1)
            if top > last:
                last, at_last = top, {result_key(key)}
            elif top == last:
                at_last.add(result_key(key))
        return last, at_last

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if trial.trial_id not in self.settled:  # where to find it while it runs
            print(f"[{self.point}] trial {trial.trial_id} started: MLflow run {run_id}", flush=True)

    def _live(self, trial) -> Optional[str]:
        """The trial's run, or None for a replay of a trial whose run is already final."""
        run_id = self._run_for(trial)
        return None if trial.trial_id in self.settled else run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric
        run_id = self._live(trial)
        if run_id is None:
            return
        step = int(result.get("iteration", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        last, at_last = self.logged.get(trial.trial_id, (-1, set()))
        values = {k: v for k, v in _numeric(result).items() if v == v}
        if result.get("report") == 0:  # a log between evaluations: its training scalars only
            values = {k: v for k, v in values.items() if k.startswith("train_")}
        if step < last:
            values = {}  # a replayed evaluation: already in the run
        elif step == last:
            values = {k: v for k, v in values.items() if k not in at_last}  # e.g. the final test metrics
        else:
            at_last = set()
        if values:
            self.client.log_batch(run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in values.items()])
        self.logged[trial.trial_id] = (max(step, last), at_last | set(values))
        digest = result.get("code_digest")
        if isinstance(digest, str) and self.digests.get(trial.trial_id) != digest:
            self.digests[trial.trial_id] = digest
            self.client.set_tag(run_id, TAG_DIGEST, digest)
            if self.digest and digest != self.digest:
                print(f"[{self.point}] WARNING: trial {trial.trial_id} runs code {digest}, the sweep {self.digest}",
                      flush=True)
        if result.get("stop_reason"):
            self.client.set_tag(run_id, "buarl.stop_reason", redact(result["stop_reason"])[:5000])
        forked = result.get("pretrained_from")
        if isinstance(forked, str) and trial.trial_id not in self.linked:
            # the trial reports the shared pre-training it loaded (orchestrator.trial.shared_start)
            from orchestrator.pretrainings import TAG_KEY, TAG_RUN
            self.client.set_tag(run_id, TAG_KEY, forked)
            if forked in self.pretrained_runs:
                self.client.set_tag(run_id, TAG_RUN, self.pretrained_runs[forked])
            self.linked.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._live(trial)
        if run_id is None:
            return
        last = trial.last_result or {}
        # a Train run's checkpoint rides in its results; a one-worker trial's is Tune's own
        path = last.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint else None)
        if path:
            with tempfile.TemporaryDirectory() as tmp:
                folder = copy_checkpoint(path, Path(tmp))
                for name in run_folder.ARTIFACTS:
                    if (folder / name).exists():
                        self.client.log_artifact(run_id, str(folder / name))
                best = folder / run_folder.BEST
                if best.exists():
                    self._export(run_id, best)
        failed = "diverged" if last.get("diverged") else "pre-training failed" if last.get("failed") else None
        if failed:
            self.client.set_tag(run_id, "buarl.status", failed)
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def _export(self, run_id: str, best: Path) -> None:
        from buarl.checkpoint import read
        from buarl.errors import CheckpointError
        try:
            obj = read(best)  # now: the folder may be a temporary copy
        except CheckpointError as e:
            print(f"WARNING: run {run_id}: MLflow model not logged ({e})", flush=True)
            return
        model_exports().submit(self.client, run_id, obj, best)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._live(trial)
        if run_id is None:
            return
        self.client.set_tag(run_id, "buarl.status", "error")
        self.client.set_terminated(run_id, status="FAILED")
