"""The names MLflow runs are found by, defined once for the sweep, the tables and export
(importing this module imports neither Ray nor MLflow)."""
TAG_ROLE = "buarl.role"              # "sweep" (the parent run) or "trial"
TAG_TRIAL = "buarl.trial_id"
TAG_SWEEP = "buarl.sweep"
TAG_POINT = "buarl.grid_point"
TAG_ROW = "buarl.row"                # a grid switch's row name (the tables' method column)
TAG_DIGEST = "buarl.code_digest"
TAG_VERSION = "buarl.code_version"
TAG_DATA = "buarl.data"              # the data's name: "ACDC", "ACDC phantom" (buarl.data.origin)
TAG_SYNTHETIC = "buarl.synthetic"    # "true" for the built-in phantom
TAG_CASES = "buarl.train_cases"      # training cases of the data: what a label ratio is a share of
PARENT = "mlflow.parentRunId"
VAL_METRICS = ("best_val_dice", "val_dice")  # what a sweep may select by; test metrics never
# metrics every trial reports at each evaluation, that a space may optimise
# (train_* scalars are the last log window's means: the loop's `loss` arrives as train_loss)
REPORTED_METRICS = ("best_val_dice", "val_dice", "train_loss")

# MLflow draws a run's charts in groups by the part of a key before "/". A trial logs its
# results in sections (train/, val/, test/, pretrain/) and its bookkeeping apart (run/);
# results inside Ray, Tune's metric and the tables keep the flat names (val_dice). Stores
# written before the sections hold flat keys: readers map what they read with result_key.
SECTIONS = ("train", "val", "test", "pretrain")
BOOKKEEPING = frozenset({"iteration", "evaluations", "resumed_from", "train_seconds", "best_step",
                         "failed", "diverged"})
_RENAMED = {"best_val_dice": "val/best_dice"}


def mlflow_key(key: str) -> str:
    """The MLflow key a result key is logged under: train_loss -> train/loss,
    best_val_dice -> val/best_dice, test_last_dice -> test/last_dice, iteration -> run/iteration."""
    if key in _RENAMED:
        return _RENAMED[key]
    if key not in BOOKKEEPING:
        for section in SECTIONS:
            if key.startswith(section + "_"):
                return f"{section}/{key[len(section) + 1:]}"
    return f"run/{key}"


def result_key(logged: str) -> str:
    """The result key of an MLflow key, whichever way it was logged (mlflow_key's inverse;
    a flat key, from a store written before the sections, is its own result key)."""
    for flat, key in _RENAMED.items():
        if logged == key:
            return flat
    section, sep, name = logged.partition("/")
    if not sep:
        return logged
    return name if section == "run" else f"{section}_{name}"


def flat_metrics(runs):
    """mlflow.search_runs' DataFrame with every `metrics.<key>` column under its result key
    (`metrics.val/best_dice` -> `metrics.best_val_dice`), so readers take stores of either
    naming, or both: where a run has a value under both names the sectioned one wins."""
    out = runs.copy()
    for col in [c for c in runs.columns if c.startswith("metrics.") and "/" in c]:
        flat = "metrics." + result_key(col.removeprefix("metrics."))
        out[flat] = out[col].combine_first(out[flat]) if flat in out else out[col]
        out = out.drop(columns=col)
    return out


def flat_run_metrics(metrics: dict) -> dict:
    """A Run's data.metrics under result keys (flat_metrics, for one run)."""
    return {**{k: v for k, v in metrics.items() if "/" not in k},
            **{result_key(k): v for k, v in metrics.items() if "/" in k}}
