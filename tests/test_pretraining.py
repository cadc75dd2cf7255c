"""Shared pre-training: a run started from a handed-over pre-training equals the same run
pre-training itself (CPU), and a pre-training is only accepted by runs it fits."""
from __future__ import annotations

import pytest
import torch

from buarl import pretraining
from buarl.config import load_config
from buarl.data import load_benchmark
from buarl.train import Reporter, train


class Evaluations(Reporter):
    def __init__(self):
        self.vals, self.losses = [], []

    def log(self, step, scalars):
        self.losses.append((step, round(scalars["loss"], 12)))

    def checkpoint(self, step, metrics, state, is_best):
        self.vals.append((step, metrics["val_dice"]))


def _cfg(root, **sets):
    return load_config("phantom", {"data_root": str(root), "pretrain_iters": 4, "iters": 6, "eval_every": 2,
                                   "log_every": 2, "threads": 1, **sets})


@pytest.mark.parametrize("sets", [{}, {"url": True, "crl": True, "url_mode": "term", "crl_mode": "soft",
                                       "tau_l": 0.2, "ema_decay": 0.95, "lambda_crl": 1.0}])
def test_forked_run_equals_the_run_that_pretrains_itself(acdc_phantom, sets):
    cfg = _cfg(acdc_phantom, **sets)
    data = load_benchmark(cfg)
    whole = Evaluations()
    expected = train(cfg, whole, data=data)
    # the pre-training made under other BUARL settings: it does not depend on them
    shared = pretraining.pretrain(_cfg(acdc_phantom, url=False, crl=False, tau_l=0.9), data=data)
    assert shared["step"] == cfg.pretrain_iters
    forked = Evaluations()
    got = train(cfg, forked, data=data, start=shared)
    for key in ("dice", "jaccard", "hd95", "asd", "best_val_dice", "best_step"):
        assert got[key] == expected[key], key
    assert got["last"]["dice"] == expected["last"]["dice"]
    # the fork reports self-training only; those evaluations and losses are the same
    assert forked.vals == [v for v in whole.vals if v[0] > cfg.pretrain_iters]
    assert forked.losses == [v for v in whole.losses if v[0] > cfg.pretrain_iters]


def test_a_pretraining_is_refused_by_a_run_it_does_not_fit(acdc_phantom, tmp_path):
    cfg = _cfg(acdc_phantom)
    pretraining.save(tmp_path / pretraining.FILE, cfg, pretraining.pretrain(cfg), digest="abc")
    obj = pretraining.read(tmp_path)
    assert pretraining.start_state(_cfg(acdc_phantom, tau_u=0.1, crl_mode="soft"), obj, "p")["step"] == 4
    with pytest.raises(pretraining.PretrainMismatch, match=r"lr: pre-trained with 0.03, this run 0.02; "
                                                           r"seed: pre-trained with 1337, this run 7$"):
        pretraining.start_state(_cfg(acdc_phantom, seed=7, lr=0.02), obj, "p")
    with pytest.raises(pretraining.PretrainMismatch, match="pretrain_iters"):
        pretraining.start_state(_cfg(acdc_phantom, pretrain_iters=5), obj, "p")
    with pytest.raises(pretraining.PretrainMismatch, match="base=mt has no pre-training"):
        pretraining.start_state(_cfg(acdc_phantom, base="mt"), obj, "p")


def test_a_file_that_is_not_a_pretraining_is_named(tmp_path):
    from buarl.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no pre-training file"):
        pretraining.read(tmp_path)
    torch.save({"format": "other"}, tmp_path / pretraining.FILE)
    with pytest.raises(CheckpointError, match="not a buarl pre-training file"):
        pretraining.read(tmp_path / pretraining.FILE)
    (tmp_path / pretraining.FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable pre-training file"):
        pretraining.read(tmp_path)


def test_the_key_holds_what_pretraining_reads_and_nothing_of_buarl():
    keys = set(pretraining.KEYS)
    assert {"seed", "labeled", "pretrain_iters", "lr", "eval_every", "data_root"} <= keys
    assert not keys & {"url", "crl", "tau_l", "tau_u", "lambda_url", "lambda_crl", "ema_decay", "url_mode",
                       "crl_mode", "region_mode", "iters", "rampup_iters", "threads"}


def test_cli_pretrain_only_then_from_pretrained_equals_a_whole_run(acdc_phantom, tmp_path, capsys):
    import json

    from buarl.cli import main
    sets = ["--data-root", str(acdc_phantom), "--set", "pretrain_iters=4", "iters=6", "eval_every=2", "log_every=2",
            "threads=1"]
    assert main(["train", *sets, "--out", str(tmp_path / "pre"), "--pretrain-only"]) == 0
    assert (tmp_path / "pre" / pretraining.FILE).is_file() and not (tmp_path / "pre" / "metrics.json").exists()
    assert main(["train", *sets, "tau_l=0.3", "--out", str(tmp_path / "fork"),
                 "--from-pretrained", str(tmp_path / "pre")]) == 0
    assert main(["train", *sets, "tau_l=0.3", "--out", str(tmp_path / "whole")]) == 0
    fork, whole = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("fork", "whole"))
    assert fork["dice"] == whole["dice"] and fork["last"]["dice"] == whole["last"]["dice"]
    assert json.loads((tmp_path / "fork" / "run.json").read_text())["from_pretrained"] == str(tmp_path / "pre")
    capsys.readouterr()
    # another seed's run refuses it, before writing anything
    assert main(["train", *sets, "seed=3", "--out", str(tmp_path / "bad"), "--from-pretrained",
                 str(tmp_path / "pre" / pretraining.FILE)]) == 2
    assert "seed: pre-trained with 1337, this run 3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["train", *sets, "base=mt", "--out", str(tmp_path / "mt"), "--pretrain-only"]) == 2
    assert "has no pre-training stage" in capsys.readouterr().err


def test_state_differences_names_every_entry_that_is_not_bit_identical():
    a = {"step": 500, "student": {"w": torch.ones(2, 2), "b": torch.zeros(2)},
         "optimizer": {"state": {0: {"momentum_buffer": torch.full((2,), 0.5)}}, "param_groups": [{"lr": 0.01}]},
         "gen": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    b = {**a, "student": {"w": torch.ones(2, 2), "b": torch.tensor([0.0, 1e-12])},
         "optimizer": {"state": {0: {"momentum_buffer": torch.full((2,), 0.5)}}, "param_groups": [{"lr": 0.02}]},
         "gen": torch.tensor([1, 2, 3], dtype=torch.int64), "best_step": 250}
    assert pretraining.state_differences(a, a) == []
    # a 1e-12 change, another dtype, a changed number in a list and an entry only one side has
    assert pretraining.state_differences(a, b) == ["best_step", "gen", "optimizer.param_groups.0.lr", "student.b"]


def test_pretrainings_of_one_setting_made_by_different_code_are_compared(tmp_path, capsys):
    """The evidence experiment's claim that every row forked from one start per seed, where
    its sweeps ran different code: copies of one setting are compared state by state."""
    from orchestrator.pretrainings import main, same_starts
    state = {"step": 4, "student": {"w": torch.arange(4.0)}, "config": {"seed": 11}}

    def put(h, seed, digest, state, **key):
        (tmp_path / "pretrain" / h).mkdir(parents=True)
        torch.save({"format": pretraining.FORMAT, "digest": digest, "state": state,
                    "key": {"dataset": "acdc", "data_root": "/d", "labeled": 3, "seed": seed, **key}},
                   tmp_path / "pretrain" / h / pretraining.FILE)

    put("a1", 11, "old", state)
    # newer code: a key and a config entry the old code did not record, the same hand-over
    put("a2", 11, "new", {**state, "config": {"seed": 11, "in_channels": 1}}, in_channels=1)
    put("b1", 12, "old", state)
    put("b2", 12, "new", {**state, "student": {"w": torch.arange(4.0) + 1}})
    # a setting both copies record, with another value: named, whatever the states say
    put("c1", 13, "old", state, pretrain_iters=4)
    put("c2", 13, "new", state, pretrain_iters=9)
    put("d1", 14, "old", state)  # one copy: nothing to compare
    rows = same_starts(str(tmp_path))
    assert [(r["seed"], r["identical"], r["differing"], r["settings_differ"]) for r in rows] == [
        (11, True, "", ""), (12, False, "student.w", ""), (13, True, "", "pretrain_iters")]
    assert main(["--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 3 | 11 | a1 (old), a2 (new) | same | yes |" in out and "| 3 | 12 |" in out and "no: student.w" in out
    assert "| 3 | 13 | c1 (old), c2 (new) | differ: pretrain_iters | yes |" in out and "| 3 | 14 |" not in out
    assert main(["--storage", str(tmp_path / "none")]) == 2
