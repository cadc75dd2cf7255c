"""Optuna studies persisted beside the sweep's Ray results: one SQLite file per sweep
(`<storage>/<sweep>/optuna.db`), one study per grid point named after it. `optuna-dashboard`
reads the file; `--warm-start OLD` copies OLD's studies into a new sweep, so its sampler
starts from OLD's finished trials."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from buarl.errors import BuarlError

FILE = "optuna.db"


class StudyError(BuarlError):
    pass


def storage_url(sweep_folder: str) -> Optional[str]:
    """The sweep's Optuna storage, or None for remote Ray storage (s3://...: the studies then
    live in memory, as Tune's default)."""
    if "://" in sweep_folder:
        return None
    return f"sqlite:///{Path(sweep_folder).resolve() / FILE}"


def rdb(url: str):
    import optuna
    return optuna.storages.RDBStorage(url)


def check_warm_start(old_folder: Path, old: str) -> None:
    if not (old_folder / FILE).is_file():
        raise StudyError(f"--warm-start {old}: no Optuna studies at {old_folder / FILE} "
                         "(a sweep with a search, run by this version, in the same --storage)")


def warm_start(old_folder: Path, new_url: str, points: list[str]) -> dict[str, int]:
    """Copy each grid point's study of the old sweep into the new storage (a point the old
    sweep did not have starts empty). Returns the finished trials copied per point."""
    import optuna
    old, new = rdb(storage_url(str(old_folder))), rdb(new_url)
    names = set(optuna.get_all_study_names(old))
    existing = set(optuna.get_all_study_names(new))
    copied = {}
    for point in points:
        if point in names and point not in existing:
            optuna.copy_study(from_study_name=point, from_storage=old, to_storage=new, to_study_name=point)
            trials = optuna.load_study(study_name=point, storage=new).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            copied[point] = len(trials)
    return copied

