"""Ray's OptunaSearch with the study as the truth for finished trials (imports Ray: only the
sweep's run imports this module, never its dry run)."""
from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class StudyTruthOptunaSearch(OptunaSearch):
    """Tune saves the searcher with its experiment state every few seconds, while the study
    marks a trial COMPLETE at once: a driver killed in between leaves a saved searcher that
    thinks the trial still runs, and on --resume the replayed report made Optuna raise
    UpdateFinishedTrialError (the sweep died with a traceback). A report for a trial the study
    has finished is dropped, and the trial counts as completed."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            self._completed_trials.add(trial_id)
