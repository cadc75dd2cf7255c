"""`buarl export --experiment NAME`: the best FINISHED trial of a sweep, chosen by the sweep's
validation metric (never a test metric), written as a model folder (`buarl.model_folder`).
Reads MLflow only; never imports Ray.
"""
from __future__ import annotations

import fnmatch
import json
import tempfile
from pathlib import Path
from typing import Optional

from buarl.checkpoint import config_of, read
from buarl.errors import ConfigError
from buarl.model_folder import write_model
from orchestrator.names import PARENT, TAG_DIGEST, TAG_POINT, TAG_ROLE, TAG_VERSION, VAL_METRICS, flat_run_metrics
from orchestrator.redaction import redact


def selection_metric(parent_params: dict) -> tuple[str, str]:
    """The sweep's own metric and mode if it is a validation metric, else best_val_dice (max)."""
    metric, mode = parent_params.get("metric", "best_val_dice"), parent_params.get("mode", "max")
    return (metric, mode) if metric in VAL_METRICS else ("best_val_dice", "max")


def pick_best(runs: list, grid_glob: str, metric: str, mode: str):
    """The best of FINISHED trial runs (MLflow Run objects) whose grid point matches."""
    values = {r.info.run_id: flat_run_metrics(r.data.metrics).get(metric) for r in runs}
    pool = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get(TAG_ROLE) == "trial"
            and fnmatch.fnmatchcase(r.data.tags.get(TAG_POINT, ""), grid_glob) and values[r.info.run_id] is not None]
    if not pool:
        return None, 0
    sign = 1 if mode == "max" else -1
    return max(pool, key=lambda r: (sign * values[r.info.run_id], -r.info.start_time)), len(pool)


def export_best(experiment: str, grid_glob: str, tracking_uri: Optional[str], out: Path,
                overwrite: bool = False) -> Path:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri {uri}: no such MLflow database (run a sweep first, or point at its store)")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"--experiment {experiment!r}: not in {redact(uri)} (experiments: {', '.join(names) or 'none'})")
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"}
    # every sweep of one experiment searches one space, so any parent names its metric
    metric, mode = selection_metric(next(iter(parents.values())).data.params if parents else {})
    best, pool = pick_best(runs, grid_glob, metric, mode)
    if best is None:
        raise ConfigError(f"--experiment {experiment!r} --grid-point {grid_glob!r}: no FINISHED trial with "
                          f"metric {metric} (grid points: "
                          f"{', '.join(sorted({r.data.tags.get(TAG_POINT, '?') for r in runs if r.data.tags.get(TAG_ROLE) == 'trial'})) or 'none'})")
    run_id = best.info.run_id
    parent = parents.get(best.data.tags.get(PARENT, ""))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ckpt = Path(client.download_artifacts(run_id, "best.pt", tmp))
        except Exception as e:
            raise ConfigError(f"MLflow run {run_id}: its best.pt artifact cannot be read ({str(e).splitlines()[0][:160]})") from None
        obj = read(ckpt)
        cfg = config_of(obj, ckpt)
        try:
            metrics = json.loads(Path(client.download_artifacts(run_id, "metrics.json", tmp)).read_text())
        except Exception:
            metrics = {k: v for k, v in flat_run_metrics(best.data.metrics).items() if k in ("best_val_dice",)}
    origin = {"selected by": f"{metric} ({mode}) among {pool} finished trial(s) of grid points `{grid_glob}`",
              "MLflow run": f"`{run_id}` in experiment `{experiment}`, store `{redact(uri)}`",
              "grid point": best.data.tags.get(TAG_POINT),
              "sweep command": f"`{parent.data.params.get('command')}`" if parent else None,
              "code version": parent.data.tags.get(TAG_VERSION) if parent else None,
              "code digest": best.data.tags.get(TAG_DIGEST)}
    return write_model(out, obj["weights"], cfg, metrics, origin, overwrite=overwrite)
