"""`python -m orchestrator.run_curves`: train.log + metrics.json folders -> curves and a summary."""
import json

import pandas as pd
import pytest

from orchestrator.run_curves import main

LOG = """[   24.5s] it    125 val_dice=0.0991 val_fg=0.0078 (true 0.0410)
[   30.1s] it    140 loss=0.68 lr=0.01 stage=pretrain
[   38.6s] it    250 val_dice=0.2490 val_fg=0.0165 (true 0.0410) (best, saved best.pt)
"""
METRICS = {"best_val_dice": 0.249, "best_step": 250, "dice": 0.4213, "jaccard": 0.31, "hd95": 12.5, "asd": 3.25,
           "empty_predictions": 3, "structures": 120}


def _run(folder, log=LOG, metrics=METRICS):
    folder.mkdir()
    (folder / "train.log").write_text(log)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_curves_and_summary(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b", LOG.replace("0.2490", "0.5000"))
    assert main([f"old={a}", f"new={b}", "--out", str(tmp_path / "out"), "--pretrain-iters", "125"]) == 0
    curves = pd.read_csv(tmp_path / "out" / "curves.csv")
    assert curves.run.tolist() == ["old", "old", "new", "new"]
    assert curves.val_dice.tolist() == [0.0991, 0.249, 0.0991, 0.5] and curves.iteration.tolist()[:2] == [125, 250]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "0.10 0.25" in summary and "42.13" in summary and "3 / 120" in summary
    assert (tmp_path / "out" / "val_curves.png").stat().st_size > 1000


def test_unfinished_run_is_named_and_nothing_written(tmp_path, capsys):
    a = _run(tmp_path / "a", metrics=None)
    with pytest.raises(SystemExit) as e:
        main([f"good={_run(tmp_path / 'b')}", f"unfinished={a}", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"run_curves: unfinished: {a / 'metrics.json'} not found "
                                       "(is the run finished? --partial draws unfinished runs)\n")
    assert not (tmp_path / "out").exists()


def test_partial_draws_an_unfinished_run_without_test_metrics(tmp_path):
    a = _run(tmp_path / "a", LOG.replace("0.2490", "0.3000"), metrics=None)
    assert main([f"done={_run(tmp_path / 'b')}", f"stopped={a}", "--out", str(tmp_path / "out"), "--partial"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    stopped = next(line for line in summary.splitlines() if line.startswith("| stopped"))
    assert "0.3 " in stopped and "stopped at 250" in stopped and "42.13" not in stopped
    assert "42.13" in summary  # the finished run keeps its test metrics
    assert pd.read_csv(tmp_path / "out" / "curves.csv").run.tolist() == ["done", "done", "stopped", "stopped"]
