"""The driver-side MLflow callback across a lost driver and `--resume` (no Ray cluster needed)."""
from types import SimpleNamespace

import pytest

from orchestrator.tracking import MlflowTrials, mark_orphans
from tests.conftest import ROOT, mlflow_store


@pytest.fixture
def sweep(tmp_path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(mlflow_store(tmp_path))
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"buarl.role": "sweep", "buarl.sweep": "s"}).info.run_id
    return client, exp, parent


def _driver(client, exp, parent):
    return MlflowTrials(client, exp, parent, "s", "labeled=3", {"labeled": 3})


def _trial(trial_id, result=None):
    return SimpleNamespace(trial_id=trial_id, config={"tau_l": 0.3}, last_result=result or {}, checkpoint=None)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_replayed_finished_trial_keeps_its_recorded_run(sweep):
    """Tune's saved state can lag a trial's end; the resumed driver replays that trial."""
    client, exp, parent = sweep
    first = _driver(client, exp, parent)
    done, cut = _trial("a"), _trial("b")
    first.on_trial_start(0, [], done)
    first.on_trial_result(0, [], done, {"iteration": 10, "val_dice": 0.4})
    first.on_trial_complete(0, [], done)
    first.on_trial_start(0, [], cut)
    first.on_trial_result(0, [], cut, {"iteration": 10, "val_dice": 0.2})
    run_a, run_b = first.runs["a"], first.runs["b"]
    ended = client.get_run(run_a).info.end_time
    # The driver dies here: "b" is left RUNNING; --resume marks it KILLED before Tune starts.
    assert mark_orphans(client, exp, parent) == 1
    assert client.get_run(run_b).info.status == "KILLED"

    second = _driver(client, exp, parent)
    for trial, value in ((done, 0.9), (cut, 0.3)):  # "a" replays its end, "b" resumes for real
        second.on_trial_start(0, [], trial)
        second.on_trial_result(0, [], trial, {"iteration": 20, "val_dice": value})
        second.on_trial_complete(0, [], trial)
    a = client.get_run(run_a).info
    assert (a.status, a.end_time) == ("FINISHED", ended)
    assert _history(client, run_a, "val/dice") == [(10, 0.4)]
    assert second.runs["b"] == run_b  # one run per trial, its history continued
    assert _history(client, run_b, "val/dice") == [(10, 0.2), (20, 0.3)]
    assert client.get_run(run_b).info.status == "FINISHED"


def test_errored_trial_reopens_its_run_on_resume(sweep):
    client, exp, parent = sweep
    first = _driver(client, exp, parent)
    trial = _trial("c")
    first.on_trial_start(0, [], trial)
    first.on_trial_error(0, [], trial)
    run = first.runs["c"]
    assert client.get_run(run).info.status == "FAILED"
    second = _driver(client, exp, parent)
    second.on_trial_start(0, [], trial)
    assert client.get_run(run).info.status == "RUNNING"
    second.on_trial_result(0, [], trial, {"iteration": 5, "val_dice": 0.5})
    second.on_trial_complete(0, [], trial)
    assert client.get_run(run).info.status == "FINISHED"
    assert _history(client, run, "val/dice") == [(5, 0.5)]


def test_worker_code_digest_is_tagged_and_a_mismatch_is_reported(sweep, capsys):
    client, exp, parent = sweep
    driver = MlflowTrials(client, exp, parent, "s", "labeled=3", {}, digest="aaaaaaaaaaaa")
    same, other = _trial("d"), _trial("e")
    for trial, digest in ((same, "aaaaaaaaaaaa"), (other, "bbbbbbbbbbbb")):
        driver.on_trial_start(0, [], trial)
        driver.on_trial_result(0, [], trial, {"iteration": 1, "val_dice": 0.1, "code_digest": digest})
    assert client.get_run(driver.runs["d"]).data.tags["buarl.code_digest"] == "aaaaaaaaaaaa"
    assert client.get_run(driver.runs["e"]).data.tags["buarl.code_digest"] == "bbbbbbbbbbbb"
    assert not {"code_digest", "run/code_digest"} & set(client.get_run(driver.runs["d"]).data.metrics)
    out = capsys.readouterr().out
    assert "trial e runs code bbbbbbbbbbbb, the sweep aaaaaaaaaaaa" in out and "trial d runs code" not in out


def test_source_digest_changes_with_any_source_file(tmp_path):
    from buarl.provenance import source_digest
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "c.yaml").write_text("k: 1\n")
    first = source_digest(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "notes.txt").write_text("not code")
    assert source_digest(pkg) == first and len(first) == 12
    (pkg / "sub" / "c.yaml").write_text("k: 2\n")
    assert source_digest(pkg) != first


def test_every_resolved_config_key_the_run_reads_is_a_param(acdc_phantom):
    from buarl.config import Config
    from orchestrator.tracking import resolved_params
    params = resolved_params({"dataset": "acdc", "data_root": str(acdc_phantom), "tau_l": 0.3})
    la_only = {"patch_size", "la_stride_xy", "la_stride_z", "la_lcc"}
    assert set(params) == set(Config.model_fields) - la_only - {"mt_consistency"}
    assert params["ema_decay"] == 0.99 and params["tau_l"] == 0.3 and params["image_size"] == 256
    la_mt = resolved_params({"dataset": "la", "base": "mt", "labeled_bs": 2, "batch_size": 4})
    assert {"patch_size", "la_lcc", "mt_consistency"} <= set(la_mt) and "image_size" not in la_mt
    assert not {"pretrain_iters", "paste_ratio", "self_train_init"} & set(la_mt)  # BCP's alone


def test_a_replayed_evaluation_is_logged_once(sweep):
    """A worker restored from its checkpoint at iteration 8 replays 12 (identically); the run
    keeps one value per step and key, the final test metrics at the last step still land,
    and a driver reopening the run on --resume knows what it holds."""
    client, exp, parent = sweep
    driver = _driver(client, exp, parent)
    trial = _trial("r")
    driver.on_trial_start(0, [], trial)
    for step in (4, 8, 12):
        driver.on_trial_result(0, [], trial, {"iteration": step, "val_dice": step / 100})
    driver.on_trial_result(0, [], trial, {"iteration": 12, "val_dice": 0.12, "resumed_from": 8})  # the replay
    driver.on_trial_result(0, [], trial, {"iteration": 16, "val_dice": 0.16, "resumed_from": 8})
    driver.on_trial_result(0, [], trial, {"iteration": 16, "val_dice": 0.16, "test_dice": 0.5, "done": 1})
    run = driver.runs["r"]
    assert _history(client, run, "val/dice") == [(4, 0.04), (8, 0.08), (12, 0.12), (16, 0.16)]
    assert _history(client, run, "test/dice") == [(16, 0.5)]
    # the replay of step 12 added only what step 12 did not hold yet
    assert _history(client, run, "run/resumed_from") == [(12, 8), (16, 8)]

    mark_orphans(client, exp, parent)  # the driver dies; a new one reopens the run
    second = _driver(client, exp, parent)
    second.on_trial_start(0, [], trial)
    assert second.logged["r"][0] == 16
    second.on_trial_result(0, [], trial, {"iteration": 16, "val_dice": 0.16, "test_dice": 0.5})
    second.on_trial_result(0, [], trial, {"iteration": 20, "val_dice": 0.2})
    assert _history(client, run, "val/dice") == [(4, 0.04), (8, 0.08), (12, 0.12), (16, 0.16), (20, 0.2)]
    assert _history(client, run, "test/dice") == [(16, 0.5)]


def test_a_log_report_adds_training_curves_only(sweep):
    """Between evaluations a trial reports its training scalars with the last evaluation's
    metrics riding along for Tune; the run gets the train_* points, not copies of val_dice."""
    client, exp, parent = sweep
    driver = _driver(client, exp, parent)
    trial = _trial("l")
    driver.on_trial_start(0, [], trial)
    driver.on_trial_result(0, [], trial, {"iteration": 4, "val_dice": 0.3, "train_loss": 1.0, "report": 1})
    for step, loss in ((6, 0.9), (8, 0.8)):
        driver.on_trial_result(0, [], trial, {"iteration": step, "val_dice": 0.3, "best_val_dice": 0.3,
                                              "train_loss": loss, "train_lr": 0.01, "report": 0})
    driver.on_trial_result(0, [], trial, {"iteration": 8, "val_dice": 0.5, "train_loss": 0.8, "report": 1})
    run = driver.runs["l"]
    assert _history(client, run, "train/loss") == [(4, 1.0), (6, 0.9), (8, 0.8)]
    assert _history(client, run, "train/lr") == [(6, 0.01), (8, 0.01)]
    assert _history(client, run, "val/dice") == [(4, 0.3), (8, 0.5)]
    assert not {"report", "run/report"} & set(client.get_run(run).data.metrics)


@pytest.mark.parametrize("source", ["train_result", "tune_checkpoint"])
def test_a_finished_trials_folder_is_found_in_either_checkpoint(sweep, tmp_path, source):
    """A trial under a TorchTrainer names its checkpoint in its last result; a one-worker
    trial's checkpoint is Tune's own (trial.checkpoint): either way its files reach MLflow."""
    client, exp, parent = sweep
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"dice": 0.5}')
    (folder / "config.yaml").write_text("base: bcp\n")
    driver = _driver(client, exp, parent)
    if source == "train_result":
        trial = _trial("a", {"iteration": 10, "checkpoint_path": str(folder)})
    else:
        trial = _trial("a", {"iteration": 10})
        trial.checkpoint = SimpleNamespace(path=str(folder))
    driver.on_trial_start(0, [], trial)
    driver.on_trial_complete(0, [], trial)
    run_id = driver.runs["a"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "config.yaml"}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_trials_model_is_exported_in_the_background_after_its_run_is_final(sweep, acdc_phantom, tmp_path, capsys):
    """The MLflow model (torch.export) no longer holds up Tune's loop: the run is FINISHED
    with its files when the callback returns, the model lands once the queue is closed, and
    the callback still pickles (Tune keeps it in tuner.pkl and resumes the unpickled copy)."""
    import ray.cloudpickle
    import torch

    from buarl.checkpoint import save_best
    from buarl.config import load_config
    from buarl.nets import build
    from orchestrator.tracking import close_model_exports
    client, exp, parent = sweep
    cfg = load_config("phantom", {"data_root": str(acdc_phantom)})
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        folder.mkdir()
        (folder / "metrics.json").write_text("{}")
    save_best(good / "best.pt", build("acdc", cfg.num_classes).state_dict(), cfg, 8, 0.5)
    (bad / "best.pt").write_bytes(b"cut short")
    driver = MlflowTrials(client, exp, parent, "s", "labeled=3", {"labeled": 3})
    ray.cloudpickle.loads(ray.cloudpickle.dumps(driver))
    for trial_id, folder in (("m", good), ("n", bad)):
        trial = _trial(trial_id, {"iteration": 8, "checkpoint_path": str(folder)})
        driver.on_trial_start(0, [], trial)
        driver.on_trial_complete(0, [], trial)
        run = client.get_run(driver.runs[trial_id])
        assert run.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "best.pt"}
    close_model_exports()
    # a logged model of the run (the UI's Models column), in MLflow's own format
    logged = client.search_logged_models([exp], filter_string=f"source_run_id = '{driver.runs['m']}'")
    assert len(logged) == 1 and logged[0].status.to_proto() == logged[0].status.READY.to_proto()
    assert logged[0].name == "model" and [o.model_id for o in client.get_run(driver.runs["m"]).outputs.model_outputs] \
        == [logged[0].model_id]
    import mlflow.pytorch
    mlflow.set_tracking_uri(client.tracking_uri)
    net = mlflow.pytorch.load_model(f"models:/{logged[0].model_id}")
    assert net(torch.zeros(2, 1, 64, 64)).shape[:2] == (2, 4)
    assert client.search_logged_models([exp], filter_string=f"source_run_id = '{driver.runs['n']}'") == []
    out = capsys.readouterr().out
    assert f"run {driver.runs['n']}: MLflow model not logged" in out and "not a readable checkpoint" in out


def test_two_drivers_opening_one_new_store_at_once_both_get_it(tmp_path):
    """Two sweeps started together on a new sqlite store: both must open it (without the
    lock one of them failed in MLflow's first migration)."""
    import subprocess
    import sys
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = f"from orchestrator.tracking import open_store; open_store({uri!r}); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=str(ROOT)) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]


def test_a_trials_run_name_starts_with_what_tells_it_apart(sweep):
    """The MLflow UI cuts names to their first characters: the trial's number and searched
    values come first; the grid point (and the data) are tags."""
    client, exp, parent = sweep
    driver = MlflowTrials(client, exp, parent, "s", "labeled=3_seed=11", {"labeled": 3, "seed": 11},
                          data={"name": "ACDC phantom", "synthetic": True, "root": "/x"})
    trial = SimpleNamespace(trial_id="4a7c8_00012", config={"tau_l": 0.312345, "crl_mode": "soft"},
                            last_result={}, checkpoint=None)
    driver.on_trial_start(0, [], trial)
    run = client.get_run(driver.runs["4a7c8_00012"])
    assert run.info.run_name == "#12 crl_mode=soft tau_l=0.312"
    assert run.data.tags["buarl.grid_point"] == "labeled=3_seed=11"
    assert (run.data.tags["buarl.data"], run.data.tags["buarl.synthetic"]) == ("ACDC phantom", "true")
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]  # the runs table's Dataset column
    assert (dataset.name, dataset.digest) == ("ACDC phantom", "unknown")
    plain = SimpleNamespace(trial_id="4a7c8_00000", config={}, last_result={}, checkpoint=None)
    driver.on_trial_start(0, [], plain)  # a search-free grid point: one trial, named by its point
    assert client.get_run(driver.runs["4a7c8_00000"]).info.run_name == "labeled=3_seed=11"


def test_a_trial_logs_its_charts_in_sections_and_its_bookkeeping_apart(sweep):
    """MLflow groups charts by the part of a key before "/": train/, val/, test/ sections and
    the bookkeeping (iteration, evaluations, resumed_from, train_seconds) in run/."""
    client, exp, parent = sweep
    driver = _driver(client, exp, parent)
    trial = _trial("s")
    driver.on_trial_start(0, [], trial)
    driver.on_trial_result(0, [], trial, {"iteration": 8, "val_dice": 0.239, "best_val_dice": 0.239,
                                          "train_loss": 0.7, "evaluations": 2, "resumed_from": 4, "report": 1})
    driver.on_trial_result(0, [], trial, {"iteration": 8, "test_dice": 0.5, "test_last_dice": 0.4,
                                          "test_dice_LV": 0.6, "train_seconds": 9.0, "done": 1})
    assert set(client.get_run(driver.runs["s"]).data.metrics) == {
        "val/dice", "val/best_dice", "train/loss", "run/evaluations", "run/resumed_from", "run/iteration",
        "test/dice", "test/last_dice", "test/dice_LV", "run/train_seconds"}


def test_a_run_logged_with_flat_keys_resumes_without_logging_again(sweep):
    """A sweep begun before the sections (flat keys in its runs) and resumed by this code: the
    reopened run's last step is read under either naming, so its final test metrics are not
    logged a second time under the new keys."""
    client, exp, parent = sweep
    driver = _driver(client, exp, parent)
    trial = _trial("o")
    driver.on_trial_start(0, [], trial)
    run = driver.runs["o"]
    for step in (4, 8):
        client.log_metric(run, "val_dice", step / 100, step=step)
    client.log_metric(run, "test_dice", 0.5, step=8)
    mark_orphans(client, exp, parent)
    second = _driver(client, exp, parent)
    second.on_trial_start(0, [], trial)
    assert second.logged["o"] == (8, {"val_dice", "test_dice"})
    second.on_trial_result(0, [], trial, {"iteration": 8, "val_dice": 0.08, "test_dice": 0.5})  # the replay
    second.on_trial_result(0, [], trial, {"iteration": 12, "val_dice": 0.12})
    assert _history(client, run, "val/dice") == [(12, 0.12)] and _history(client, run, "test/dice") == []


def test_metric_keys_map_to_mlflow_sections_and_back():
    import pandas as pd
    from orchestrator.names import flat_metrics, flat_run_metrics, mlflow_key, result_key
    expected = {"train_loss": "train/loss", "val_dice": "val/dice", "best_val_dice": "val/best_dice",
                "test_last_hd95": "test/last_hd95", "test_dice_RV": "test/dice_RV", "iteration": "run/iteration",
                "train_seconds": "run/train_seconds", "pretrain_best_step": "pretrain/best_step"}
    assert {k: mlflow_key(k) for k in expected} == expected
    assert {v: result_key(v) for v in expected.values()} == {v: k for k, v in expected.items()}
    assert result_key("test_dice") == "test_dice"  # a flat key of an older store
    runs = pd.DataFrame({"metrics.test/dice": [0.5, None], "metrics.test_dice": [0.1, 0.3],
                         "metrics.val/best_dice": [0.4, None]})
    flat = flat_metrics(runs)
    assert sorted(flat.columns) == ["metrics.best_val_dice", "metrics.test_dice"]
    assert flat["metrics.test_dice"].tolist() == [0.5, 0.3]  # the sectioned value where a run has both
    assert flat_run_metrics({"val/best_dice": 0.4, "test_dice": 0.2}) == {"best_val_dice": 0.4, "test_dice": 0.2}
