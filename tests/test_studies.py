"""Optuna studies persisted per sweep: --warm-start copies them, --resume never grows a sweep."""
import json

import optuna
import pytest

from orchestrator import studies
from orchestrator.sweep import main as sweep_main
from tests.conftest import mlflow_store


@pytest.fixture(autouse=True)
def _no_other_cluster(monkeypatch):
    """These refusals come before Ray; another cluster on the machine (a test elsewhere, an
    experiment) is refused first, by design, and is not what these tests look at."""
    import orchestrator.sweep
    monkeypatch.setattr(orchestrator.sweep, "live_local_cluster", lambda: None)


def _old_sweep(folder, point="labeled=2_seed=1337", values=(0.4, 0.6)):
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name=point, storage=studies.storage_url(str(folder)), direction="maximize")
    for v in values:
        trial = study.ask({"tau_l": optuna.distributions.FloatDistribution(0.1, 0.9)})
        study.tell(trial, v)
    return folder


def test_storage_is_a_sqlite_file_in_the_sweep_folder_and_none_when_remote(tmp_path):
    assert studies.storage_url(str(tmp_path / "s")) == f"sqlite:///{tmp_path / 's' / 'optuna.db'}"
    assert studies.storage_url("s3://bucket/ray/s") is None


def test_warm_start_copies_each_points_finished_trials(tmp_path):
    old = _old_sweep(tmp_path / "old")
    new = tmp_path / "new"
    new.mkdir()
    copied = studies.warm_start(old, studies.storage_url(str(new)), ["labeled=2_seed=1337", "labeled=3_seed=1337"])
    assert copied == {"labeled=2_seed=1337": 2}  # a point the old sweep lacked starts empty
    study = optuna.load_study(study_name="labeled=2_seed=1337", storage=studies.storage_url(str(new)))
    assert sorted(t.value for t in study.trials) == [0.4, 0.6] and study.best_value == 0.6


def test_warm_start_from_a_sweep_without_studies_is_refused_before_anything(tmp_path, capsys):
    rc = sweep_main(["--space", "phantom_tiny", "--storage", str(tmp_path / "ray"), "--name", "b",
                     "--warm-start", "nosuch", "--tracking-uri", mlflow_store(tmp_path, "m.db")])
    err = capsys.readouterr().err
    assert rc == 2 and "--warm-start nosuch: no Optuna studies" in err
    assert not (tmp_path / "ray" / "b").exists()


def test_resume_with_other_num_samples_is_refused_with_the_way_to_grow(tmp_path, capsys):
    folder = tmp_path / "ray" / "phantom_tiny"
    folder.mkdir(parents=True)
    from orchestrator.sweep import parser, prepare, space_digest
    plan, _ = prepare(parser().parse_args(["--space", "phantom_tiny"]))
    (folder / "buarl_sweep.json").write_text(json.dumps({"name": "phantom_tiny", "space_digest": space_digest(plan),
                                                         "trials_per_point": 2}))
    rc = sweep_main(["--space", "phantom_tiny", "--storage", str(tmp_path / "ray"), "--resume", "--num-samples", "5",
                     "--tracking-uri", mlflow_store(tmp_path, "m.db")])
    err = capsys.readouterr().err
    assert rc == 2 and "planned with 2 trial(s) per grid point, not 5" in err
    assert "--warm-start phantom_tiny" in err
