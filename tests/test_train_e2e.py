"""End-to-end runs of `buarl train` / `buarl evaluate` with tiny iteration counts."""
import json
from pathlib import Path

import pytest
import torch
import yaml

import buarl
from buarl.cli import main
from buarl.config import load_config
from buarl.method.losses import region_loss
from buarl.method.uncertainty import entropy_map, perturb
from buarl.method.weights import low_region
from buarl.provenance import source_digest
from buarl.train import Loop, Reporter, train
from tests.conftest import SHARED, needs_real_data

TINY = ["pretrain_iters=4", "iters=6", "eval_every=5", "log_every=5"]


def _check_run(out, dataset):
    assert {"config.yaml", "best.pt", "metrics.json", "train.log", "run.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["jaccard"] <= metrics["dice"] + 1e-9
    assert metrics["hd95"] >= 0 and metrics["asd"] >= 0
    names = ["RV", "Myo", "LV"] if dataset == "acdc" else ["LA"]
    assert sorted(metrics["per_class"]) == sorted(names)
    assert len(metrics["per_case"]) == metrics["cases"] > 0
    assert metrics["empty_policy"] == "reference" and metrics["empty_predictions"] >= 0
    nested = yaml.safe_load((out / "config.yaml").read_text())
    assert list(nested) == ["method", "protocol", "execution"]
    cfg = {k: v for section in nested.values() for k, v in section.items()}
    assert load_config(str(out / "config.yaml")).to_dict() == cfg  # the resolved config reloads as is
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == cfg["seed"] and run["code_version"] and run["data_root"] == cfg["data_root"]
    assert run["buarl_digest"] == source_digest(Path(buarl.__file__).parent)
    return metrics


def _evaluate_reproduces(out, capsys, metrics):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for k in ("dice", "jaccard", "hd95", "asd", "empty_predictions"):
        assert printed[k] == pytest.approx(metrics[k], abs=1e-9), k
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("evaluate")) == []  # nothing beside the checkpoint
    written = out.parent / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--out", str(written)]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert len(summary) <= 8 and f"Dice {100 * metrics['dice']:.2f} %" in summary[1]
    assert json.loads(written.read_text())["dice"] == pytest.approx(metrics["dice"], abs=1e-9)
    assert (out / "metrics.json").exists()  # evaluation never overwrites the training metrics


@pytest.mark.slow
def test_train_and_evaluate_acdc_phantom(acdc_phantom, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "phantom", "--data-root", str(acdc_phantom), "--out", str(out),
                 "--set", *TINY]) == 0
    log = (out / "train.log").read_text()
    assert "val_dice=" in log and "it      5/10 loss=" in log and "eta=" in log
    _evaluate_reproduces(out, capsys, _check_run(out, "acdc"))
    # A second run into the same folder is refused rather than overwriting it.
    assert main(["train", "--config", "phantom", "--data-root", str(acdc_phantom), "--out", str(out)]) == 2


@pytest.mark.slow
def test_train_and_evaluate_la_phantom(la_phantom, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "phantom_la", "--data-root", str(la_phantom), "--out", str(out),
                 "--set", "pretrain_iters=2", "iters=3", "eval_every=5"]) == 0
    _evaluate_reproduces(out, capsys, _check_run(out, "la"))


@pytest.mark.slow
def test_default_runs_on_a_cached_phantom(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *TINY]) == 0
    assert "using the built-in ACDC phantom" in capsys.readouterr().err
    _check_run(out, "acdc")


class Collect(Reporter):
    def __init__(self):
        self.logs, self.evals = [], []

    def log(self, step, scalars):
        self.logs.append((step, scalars))

    def checkpoint(self, step, metrics, state, is_best):
        self.evals.append((step, metrics, is_best))


@pytest.mark.slow
@pytest.mark.parametrize("base, url, crl, consistency", [
    ("supervised", True, False, "pseudo"), ("mt", True, True, "pseudo"), ("mt", False, False, "pseudo"),
    ("mt", True, True, "mse"), ("bcp", False, True, "pseudo")])
def test_every_base_and_switch_trains(acdc_phantom, base, url, crl, consistency):
    sets = {"data_root": str(acdc_phantom), "base": base, "url": url, "crl": crl, "mt_consistency": consistency,
            "pretrain_iters": 2,
            "iters": 4, "eval_every": 2, "log_every": 2, "rampup_iters": 4, "uncertainty": "entropy"}
    rep = Collect()
    metrics = train(load_config("phantom", sets), rep)
    assert [s for s, _ in rep.logs] == ([2, 4, 6] if base == "bcp" else [2, 4])
    if url:
        assert all(0 <= sc["frac_high"] <= 1 for _, sc in rep.logs if "frac_high" in sc)
    assert 0 <= metrics["dice"] <= 1


def test_mt_mse_step_is_labeled_loss_plus_masked_softmax_mse(acdc_phantom):
    """mt_consistency=mse: the unlabeled term is the CRL-weighted squared softmax difference
    to the teacher fed a noisy input, and no pseudo-label enters the loss."""
    sets = {"data_root": str(acdc_phantom), "base": "mt", "mt_consistency": "mse", "url": False, "crl": True,
            "region_mode": "quantile", "tau_u": 0.5, "lambda_crl": 0.3, "rampup_iters": 0, "batch_size": 4, "labeled_bs": 2}
    loop = Loop(load_config("phantom", sets), Reporter(), wrap=lambda m: m)
    lab, unl = loop.sampler.next()
    x_l, y_l = loop.data.batch(lab, loop.gen)
    x_u = loop.data.batch(unl, loop.gen)[0]
    # A teacher unlike the student, so the consistency term is not zero.
    with torch.no_grad():
        for p in loop.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    gen_state, rng_state = loop.gen.get_state(), torch.get_rng_state()
    loss, stats = loop.mt_step(x_l, y_l, x_u, t=0)
    loop.gen.set_state(gen_state)
    torch.set_rng_state(rng_state)
    with torch.no_grad():
        logits = loop.student(torch.cat([x_l, x_u]))
        p_t = loop.teacher_probs(perturb(x_u, loop.gen))
        low = low_region(entropy_map(p_t), 0.5, "quantile")  # per image: below its median U
        sup = region_loss(logits[:2], y_l, torch.ones_like(y_l, dtype=torch.float), torch.ones_like(y_l, dtype=torch.float))
        sq = ((torch.softmax(logits[2:], 1) - p_t) ** 2).mean(1)
        expected = sup + (0.3 * low * sq).sum() / sq.numel()
    assert 0 < low.mean() < 1, "the test needs pixels on both sides of the threshold"
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["frac_low"].item() == pytest.approx(low.mean().item(), rel=1e-6)


@pytest.mark.slow
def test_mc_entropy_and_student_source(acdc_phantom):
    for extra in ({"uncertainty": "mc_entropy", "mc_passes": 2}, {"uncertainty_source": "student"},
                  {"region_mode": "quantile", "tau_l": 0.8, "tau_u": 0.5}):
        cfg = load_config("phantom", {"data_root": str(acdc_phantom), "pretrain_iters": 1, "iters": 2,
                                      "eval_every": 10, **extra})
        assert 0 <= train(cfg)["dice"] <= 1


@pytest.mark.slow
def test_same_seed_same_metrics(acdc_phantom):
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "pretrain_iters": 3, "iters": 4,
                                  "eval_every": 2, "log_every": 2})
    runs = [Collect() for _ in range(3)]
    a, b = train(cfg, runs[0]), train(cfg, runs[1])
    for k in ("dice", "jaccard", "hd95", "asd", "best_val_dice"):
        assert a[k] == b[k], k
    losses = [[sc["loss"] for _, sc in r.logs] for r in runs]
    assert losses[0] == losses[1] and len(losses[0]) > 1
    train(cfg.model_copy(update={"seed": cfg.seed + 1}), runs[2])
    losses[2] = [sc["loss"] for _, sc in runs[2].logs]
    assert losses[2] != losses[0], "another seed must change the batches and the losses"


@pytest.mark.slow
@needs_real_data
def test_real_acdc_tiny(tmp_path, capsys):
    out = tmp_path / "acdc"
    assert main(["train", "--config", "acdc_cpu", "--data-root", str(SHARED / "ACDC"), "--out", str(out),
                 "--set", "labeled=3", "pretrain_iters=2", "iters=3", "eval_every=5", "val_cases=2",
                 "test_cases=2"]) == 0
    metrics = _check_run(out, "acdc")
    assert metrics["cases"] == 2
    _evaluate_reproduces(out, capsys, metrics)


@pytest.mark.slow
@needs_real_data
def test_real_la_tiny(tmp_path):
    out = tmp_path / "la"
    assert main(["train", "--config", "la_cpu", "--data-root", str(SHARED / "LA"), "--out", str(out),
                 "--set", "pretrain_iters=2", "iters=2", "eval_every=10", "val_cases=1", "test_cases=1",
                 "la_stride_xy=64", "la_stride_z=48"]) == 0
    assert _check_run(out, "la")["cases"] == 1


def test_a_failed_run_writes_its_error_into_train_log(acdc_phantom, tmp_path, monkeypatch, capsys):
    import buarl.train as train_module
    from buarl.errors import TrainingDiverged

    def diverge(cfg, reporter, data=None, start=None):
        raise TrainingDiverged("loss became nan by iteration 3 (lr=0.03); lower the learning rate")
    monkeypatch.setattr(train_module, "train", diverge)
    out = tmp_path / "run"
    assert main(["train", "--config", "phantom", "--data-root", str(acdc_phantom), "--out", str(out)]) == 3
    assert (out / "train.log").read_text().splitlines()[-1] == \
        "ERROR: run ended with TrainingDiverged: loss became nan by iteration 3 (lr=0.03); lower the learning rate"


def test_progress_is_one_updating_line_on_a_terminal(tmp_path):
    import io

    from buarl.reporting import LocalReporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    cfg = load_config("phantom", {"pretrain_iters": 20, "iters": 60})
    rep = LocalReporter(cfg, tmp_path, stream=term)
    rep.log(10, {"loss": 0.5, "stage": "pretrain"})
    rep.checkpoint(30, {"val_dice": 0.25, "val_fg": 0.1, "val_fg_true": 0.1}, {}, is_best=False)
    rep.log(40, {"loss": 0.4, "stage": "self"})
    shown = term.getvalue()
    assert "40/80" in shown and "val_dice=0.25" in shown and "\r" in shown  # tqdm's line, redrawn
    assert shown.count("it     30 val_dice=0.2500") == 1  # the evaluation printed once, above the bar
    log = (tmp_path / "train.log").read_text().splitlines()
    assert [ln.split("] ", 1)[1][:22] for ln in log] == ["it     10 loss=0.5 sta", "it     30 val_dice=0.2", "it     40 loss=0.4 sta"]


def test_one_writer_names_the_run_files(tmp_path, acdc_phantom):
    """buarl/run_folder.py writes what `buarl train`, a Ray trial's checkpoint and MLflow's
    artifacts hold; the files read back as a checkpoint, a config and the metrics."""
    import json

    from buarl import run_folder
    from buarl.checkpoint import config_of, read
    from buarl.config import load_config
    from buarl.data import load_benchmark
    from buarl.nets import build

    cfg = load_config("phantom", {"data_root": str(acdc_phantom)})
    weights = build("acdc", 4).state_dict()
    metrics = {"best_step": 6, "best_val_dice": 0.25, "dice": 0.5}
    run_folder.write_final(tmp_path, cfg, metrics, weights, load_benchmark(cfg).val[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(run_folder.ARTIFACTS)
    best = read(tmp_path / run_folder.BEST)
    assert best["step"] == 6 and best["val_dice"] == 0.25 and config_of(best, tmp_path / "best.pt") == cfg
    assert json.loads((tmp_path / run_folder.METRICS).read_text()) == metrics
    assert (tmp_path / run_folder.REGIONS).stat().st_size > 1000


def test_best_val_dice_is_the_best_so_far_of_its_stage(acdc_phantom):
    """At a pre-training evaluation best_val_dice is pre-training's best so far (what
    self-training starts from), never 0 beside a positive val_dice; in self-training it is
    self-training's own best so far, the run's result."""
    class Evaluations(Reporter):
        def __init__(self):
            self.seen = []

        def checkpoint(self, step, metrics, state, is_best):
            self.seen.append((step, metrics["val_dice"], metrics["best_val_dice"]))

    rec = Evaluations()
    cfg = load_config("phantom", {"data_root": str(acdc_phantom), "pretrain_iters": 6, "iters": 6,
                                  "eval_every": 2, "log_every": 2, "threads": 1})
    metrics = train(cfg, rec)
    pre, self_ = [s for s in rec.seen if s[0] <= 6], [s for s in rec.seen if s[0] > 6]
    assert len(pre) == 3 and len(self_) == 3
    for stage in (pre, self_):
        for i, (_, _, best) in enumerate(stage):
            assert best == max(v for _, v, _ in stage[:i + 1])
    assert metrics["best_val_dice"] == self_[-1][2]
    assert {k: metrics["data"][k] for k in ("name", "synthetic", "root")} == {
        "name": "ACDC phantom", "synthetic": True, "root": str(acdc_phantom)}
    assert len(metrics["data"]["digest"]) == 12
