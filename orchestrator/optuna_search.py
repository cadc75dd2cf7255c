"""Ray's OptunaSearch with the study as the truth for finished trials, its objective named,
and each Optuna trial linked to its MLflow run (imports Ray: only the sweep's run imports
this module, never its dry run)."""
from __future__ import annotations

import warnings
from typing import Optional

import optuna
from ray.tune.search.optuna import OptunaSearch


class StudyTruthOptunaSearch(OptunaSearch):
    """Tune saves the searcher with its experiment state every few seconds, while the study
    marks a trial COMPLETE at once: a driver killed in between leaves a saved searcher that
    thinks the trial still runs, and on --resume the replayed report made Optuna raise
    UpdateFinishedTrialError (the sweep died with a traceback). A report for a trial the study
    has finished is dropped, and the trial counts as completed.

    `run_ids` (Tune trial id -> MLflow run id) is the tracking callback's own map, shared, not
    copied: the first result of a trial records its run id (and Tune trial id) as user
    attributes of its Optuna trial, where optuna-dashboard shows them."""

    def __init__(self, *args, run_ids: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_ids = run_ids if run_ids is not None else {}
        self.linked: set[str] = set()

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if isinstance(self._metric, str):  # the dashboard's name for the objective, not "Objective 0"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self._metric])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._link(trial_id)
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            self._completed_trials.add(trial_id)

    def _link(self, trial_id: str) -> None:
        run_id, ot_trial = self.run_ids.get(trial_id), self._ot_trials.get(trial_id)
        if trial_id in self.linked or run_id is None or ot_trial is None:
            return
        try:
            ot_trial.set_user_attr("mlflow_run_id", run_id)
            ot_trial.set_user_attr("tune_trial_id", trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished before this driver saw it (a resume): linked by its first driver
        self.linked.add(trial_id)

    def save(self, checkpoint_path: str) -> None:
        shared, self.run_ids = self.run_ids, {}  # the callback's map stays the callback's
        try:
            super().save(checkpoint_path)
        finally:
            self.run_ids = shared

    def restore(self, checkpoint_path: str) -> None:
        shared = self.run_ids
        super().restore(checkpoint_path)
        self.run_ids = shared
        self.__dict__.setdefault("linked", set())
