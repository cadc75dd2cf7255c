"""A sweep's shared pre-trainings: one per distinct (data, labeled, seed, pre-training
settings, code), run as Ray tasks before the trials, each trial of that key forked from it.

plan:  grid points -> the key of each point's pre-training (buarl.pretraining.key_of plus the
       code digest), when every trial of the point shares it (nothing it depends on is
       searched), the point's trials run the loop in their Tune trial, and it has one (bcp)
run:   per key, `<storage>/pretrain/<hash>/pretrained.pt`: reused when it is there
       (`--resume` after a killed driver, another sweep of the same storage), else made by
       a Ray task; an unfinished one is made again. A failed one is recorded, and each of its trials ends FAILED with the
       reason instead of running.
MLflow: a run per key (role `pretrain`: its settings, its validation curve); every trial
       of the key links to it (tag `buarl.pretrained_run`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Optional

from buarl import pretraining
from buarl.config import validate
from buarl.train import Reporter
from orchestrator import storage as storage_fs
from orchestrator.names import mlflow_key
from orchestrator.space import with_probe

FOLDER = "pretrain"
TAG_KEY = "buarl.pretrain_key"
TAG_RUN = "buarl.pretrained_run"


def key_hash(values: dict, digest: str) -> str:
    """12 hex digits naming a pre-training: its settings and the code that computes it
    (`digest`: of buarl/, the method; the orchestrator only schedules it)."""
    text = json.dumps({"key": values, "code": digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def method_digest() -> str:
    """The digest of the buarl/ sources this process runs (the driver's and the workers' are
    the same: the sweep ships its own)."""
    import buarl
    from buarl.provenance import source_digest
    return source_digest(Path(buarl.__file__).resolve().parent)


def hash_of(cfg) -> str:
    return key_hash(pretraining.key_of(cfg), method_digest())


def plan(plan) -> tuple[dict[str, dict], dict[str, str], list[str]]:
    """(hash -> config values of one pre-training, grid point -> hash, why points pre-train
    themselves). A point is forked when its trials run in their Tune trial (one worker: a
    DDP pre-training is another computation), it has a pre-training stage and no searched key
    changes it."""
    keys, points, own = {}, {}, []
    searched_keys = sorted(set(plan.space.search) & set(pretraining.KEYS))
    for point in plan.points:
        values = {**plan.base, **point.values, "threads": plan.threads_per_worker}
        cfg = validate(with_probe(values, plan.space.search), source=f"grid point {point.name}")
        if not pretraining.forks(cfg):
            continue
        if not plan.space.shared_pretraining:
            own.append(f"{point.name}: shared_pretraining is off in the space")
        elif not plan.space.resources.loop_in_trial:
            own.append(f"{point.name}: trials run under Ray Train (several workers or runner: train)")
        elif searched_keys:
            own.append(f"{point.name}: the search changes pre-training ({', '.join(searched_keys)})")
        else:
            h = hash_of(cfg)
            keys.setdefault(h, values)
            points[point.name] = h
    return keys, points, own


def describe(keys: dict, points: dict, own: list[str], trials_per_point: int) -> list[str]:
    forks = len(points) * trials_per_point
    iters = {h: int(v.get("pretrain_iters", 0)) for h, v in keys.items()}
    saved = sum(iters[h] * trials_per_point for h in points.values()) - sum(iters.values())
    lines = [f"  pre-training: {len(keys)} shared (one per data, labeled, seed and pre-training settings), "
             f"{forks} trial(s) forked from them: {saved} fewer iterations than the budget above"]
    for h, values in keys.items():
        users = [p for p, k in points.items() if k == h]
        lines.append(f"    - {h}: labeled={values.get('labeled')} seed={values.get('seed')} "
                     f"pretrain_iters={values.get('pretrain_iters')} -> {len(users) * trials_per_point} trial(s)")
    lines += [f"    own pre-training: {why}" for why in own]
    return lines


def location(storage: str, h: str) -> str:
    """Beside the sweeps of one --storage, not inside one: the hash names the settings and
    the code, so every sweep there (a later row, a --resume) reuses what another made."""
    return f"{storage}/{FOLDER}/{h}/{pretraining.FILE}"


def read_state(path: str) -> dict:
    import torch
    return torch.load(io.BytesIO(storage_fs.read_bytes(path)), map_location="cpu", weights_only=True)


class _Curve(Reporter):
    """Collects a pre-training's validations (the task returns them to the driver)."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []

    def checkpoint(self, step, metrics, state, is_best):
        self.points.append((step, float(metrics["val_dice"])))

    def warn(self, step, message):
        print(f"pre-training: warning at iteration {step}: {message}", file=sys.stderr, flush=True)


def run_one(values: dict, data: Optional[tuple], dest: str) -> dict:
    """A Ray task's body: pre-train, write the file, return the validation curve."""
    import torch

    from orchestrator.trial import trial_data

    cfg = validate(values, source="pre-training config")
    started = time.time()
    curve = _Curve()
    state = pretraining.pretrain(cfg, trial_data(cfg, data), curve)
    buffer = io.BytesIO()
    torch.save(pretraining.package(cfg, state, method_digest()), buffer)
    storage_fs.write_bytes(dest, buffer.getvalue())
    best = state.get("pre_best") or {}
    return {"curve": curve.points, "seconds": time.time() - started,
            "best_val_dice": best.get("dice"), "best_step": best.get("step")}


def mlflow_run(client, exp_id: str, parent_id: str, sweep: str, h: str, values: dict) -> str:
    """The key's MLflow run: found again (a resumed sweep), else created with its settings."""
    from mlflow.entities import Param

    from orchestrator.names import TAG_ROLE, TAG_SWEEP
    from orchestrator.redaction import redact
    found = client.search_runs([exp_id], f"tags.{TAG_KEY} = '{h}' and tags.{TAG_ROLE} = 'pretrain'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pretrain-{h}", tags={
        "mlflow.parentRunId": parent_id, TAG_ROLE: "pretrain", TAG_KEY: h, TAG_SWEEP: sweep})
    key = pretraining.key_of(validate(values, source="pre-training config"))
    client.log_batch(run.info.run_id, params=[Param(k, redact(v)[:6000]) for k, v in sorted(key.items())])
    return run.info.run_id


def run_all(keys: dict, storage: str, sweep: str, shared: dict, points: dict, resources,
            client, exp_id: str, parent_id: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Every key's pre-training, reused or made (as many at once as the cluster fits).
    Returns (hash -> {"path"} or {"error"}, hash -> MLflow run id)."""
    import ray
    from mlflow.entities import Metric

    done, runs, pending = {}, {}, {}
    task = ray.remote(run_one).options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
                                       max_retries=0)
    data_of = {h: shared.get(next(p for p, k in points.items() if k == h)) for h in keys}
    for h, values in keys.items():
        runs[h] = mlflow_run(client, exp_id, parent_id, sweep, h, values)
        path = location(storage, h)
        if storage_fs.kind(path) == "file":
            print(f"[pre-training {h}] reused: {path}", flush=True)
            done[h] = {"path": path}
            client.set_terminated(runs[h], status="FINISHED")
            continue
        print(f"[pre-training {h}] started (labeled={values.get('labeled')}, seed={values.get('seed')}, "
              f"{values.get('pretrain_iters')} iterations): MLflow run {runs[h]}", flush=True)
        client.update_run(runs[h], status="RUNNING")
        pending[task.remote(values, data_of[h], path)] = h
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        h = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as e:  # the task's own error, or its worker lost
            cause = getattr(e, "cause", None) or e
            reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500]}"
            print(f"[pre-training {h}] FAILED: {reason}; its trials fail with this reason", flush=True)
            done[h] = {"error": f"pre-training {h} failed: {reason}"}
            client.set_tag(runs[h], "buarl.stop_reason", reason)
            client.set_terminated(runs[h], status="FAILED")
            continue
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key("val_dice"), v, now, step) for step, v in result["curve"]]
        for key in ("best_val_dice", "best_step", "seconds"):
            if result.get(key) is not None:
                metrics.append(Metric(mlflow_key(f"pretrain_{key}"), float(result[key]), now, 0))
        client.log_batch(runs[h], metrics=metrics)
        client.set_terminated(runs[h], status="FINISHED")
        done[h] = {"path": location(storage, h)}
        best = result.get("best_val_dice")
        print(f"[pre-training {h}] done in {result['seconds']:.0f} s, best val Dice "
              f"{float('nan') if best is None else best:.4f} at iteration {result.get('best_step')}", flush=True)
    return done, runs


def same_starts(storage: str) -> list[dict]:
    """Per pre-training setting (data, labeled, seed) kept in `<storage>/pretrain/` more than
    once (a change to buarl/ makes the sweep pre-train again): whether every copy hands over
    the same state. Identical copies mean the rows of an experiment forked from the same start
    even where their sweeps ran different code. Settings are compared on the keys both copies
    record (newer code records keys that older code lacked), and the stored config is left
    out of the state for the same reason. Each copy is compared with its setting's first as it
    is read: one state per setting is held, not every file."""
    groups: dict[tuple, dict] = {}
    for path in sorted(Path(storage, FOLDER).glob(f"*/{pretraining.FILE}")):
        obj = pretraining.read(path)
        key, state = obj["key"], {k: v for k, v in obj["state"].items() if k != "config"}
        copy = f"{path.parent.name} ({obj['digest'][:8]})"
        setting = (key.get("dataset"), key.get("data_root"), key.get("labeled"), key.get("seed"))
        if setting not in groups:
            groups[setting] = {"key": key, "state": state, "copies": [copy], "settings": set(), "differing": set()}
            continue
        g = groups[setting]
        g["copies"].append(copy)
        g["settings"] |= {k for k in set(g["key"]) & set(key) if g["key"][k] != key[k]}
        g["differing"] |= set(pretraining.state_differences(g["state"], state))
    rows = []
    for (_, _, labeled, seed), g in groups.items():
        if len(g["copies"]) > 1:
            differing = sorted(g["differing"])
            rows.append({"labeled": labeled, "seed": seed, "copies": ", ".join(g["copies"]),
                         "settings_differ": ", ".join(sorted(g["settings"])), "identical": not differing,
                         "differing": ", ".join(differing[:5]) + (" ..." if len(differing) > 5 else "")})
    return sorted(rows, key=lambda r: (r["labeled"], r["seed"]))


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m orchestrator.pretrainings --storage DIR [--out FILE]`: same_starts as a
    Markdown table (stdout, or FILE)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m orchestrator.pretrainings",
                                     description="Do the shared pre-trainings that different code made for one "
                                                 "setting hand over identical states?")
    parser.add_argument("--storage", required=True, help="a sweep's --storage folder (holds pretrain/)")
    parser.add_argument("--out", help="write the table here (Markdown) instead of stdout")
    args = parser.parse_args(argv)
    if not Path(args.storage, FOLDER).is_dir():
        print(f"--storage {args.storage}: no {FOLDER}/ folder (no shared pre-training was made there)", file=sys.stderr)
        return 2
    rows = same_starts(args.storage)
    lines = ["| labeled | seed | copies (hash, code digest) | settings | identical hand-over |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['labeled']} | {r['seed']} | {r['copies']} | "
              f"{'differ: ' + r['settings_differ'] if r['settings_differ'] else 'same'} | "
              f"{'yes' if r['identical'] else 'no: ' + r['differing']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
