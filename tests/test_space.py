"""Search-space validation and planning: all before Ray starts."""
import os
import subprocess
import sys
import textwrap

import pytest

from orchestrator.space import load_space, make_plan
from orchestrator.sweep import main
from tests.conftest import ROOT

GOOD = """
base_config: phantom
grid: {labeled: [2, 3]}
search:
  tau_l: {type: uniform, low: 0.1, high: 0.9}
  ema_decay: {type: loguniform, low: 0.9, high: 0.999}
  rampup_iters: {type: int, low: 0, high: 100, step: 10}
  uncertainty: {type: categorical, choices: [entropy, mc_entropy]}
num_samples: 2
"""


def _write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_spaces_plan(capsys):
    for name in ("thresholds", "ema", "loss_weights", "ablation", "paper_acdc", "paper_la", "phantom_tiny"):
        assert main(["--space", name, "--dry-run"]) == 0, name
    out = capsys.readouterr().out
    assert "grid points (21), one trial each (no search)" in out  # ablation: 7 switches x 3 seeds


def test_one_study_per_label_ratio(tmp_path):
    space, path = load_space(str(_write(tmp_path, GOOD)))
    plan = make_plan(space, path, None, None, 1, 2)
    assert [p.values["labeled"] for p in plan.points] == [2, 3]
    assert plan.trials_per_point == 2 and plan.total_trials == 4


def test_dry_run_prints_the_plan_without_starting_ray(tmp_path):
    code = ("import sys; from orchestrator.sweep import main; "
            f"rc = main(['--space', {str(_write(tmp_path, GOOD))!r}, '--dry-run']); "
            "assert 'ray' not in sys.modules, 'dry-run imported ray'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for fragment in ("labeled=2_seed=1337", "labeled=3_seed=1337", "tau_l: uniform [0.1, 0.9]",
                     "ema_decay: loguniform [0.9, 0.999]", "rampup_iters: int [0, 100]",
                     "uncertainty: categorical choices ['entropy', 'mc_entropy']",
                     "trials: 2 per grid point, 4 in total", "iteration budget: 80 per trial, 320 in total",
                     "1 worker(s) x 1.0 CPU"):
        assert fragment in out.stdout, fragment
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize("text, fragment", [
    ("grid: {labeled: [2]}\nsearchh: {}\n", "unknown key 'searchh'"),
    ("grid: {labeled: [2]}\nsearch: {tau_l: {type: uniform, low: 0.9, high: 0.1}}\n", "search.tau_l: low=0.9 > high=0.1"),
    ("grid: {labeled: [2]}\nsearch: {tau_q: {type: uniform, low: 0.1, high: 0.2}}\n", "search.tau_q: unknown parameter"),
    ("grid: {labeled: [2]}\nsearch: {tau_l: {type: uniform, low: low, high: 0.2}}\n", "search.tau_l.low"),
    ("grid: {labeled: [2]}\nsearch: {tau_l: {type: gaussian, low: 0.1, high: 0.2}}\n", "distribution type must be one of"),
    ("grid: {labeled: [2]}\nsearch: {lr: {type: loguniform, low: 0.0, high: 0.1}}\n", "loguniform needs low > 0"),
    ("grid: {labeled: [2]}\nsearch: {tau_l: {type: uniform, low: 0.5, high: 1.5}}\n", "value 1.5 is outside"),
    ("grid: {labeled: []}\n", "grid.labeled"),
    ("grid: {labeled: [2]}\nnum_samples: 0\n", "num_samples"),
    ("grid: {labeled: [2]}\nresources: {workers: 64}\n", "one trial needs 64 CPUs"),
    ("grid: {labeled: [2]}\nfixed: {labeled_bs: 99}\n", "labeled_bs=99 is larger than batch_size"),
    ("grid: {labeled: [2]}\nmetric: loss\nmode: min\n", "'loss' is not a metric the trials report (use best_val_dice, val_dice, train_loss)"),
    ("grid: {labeled: [2]}\nresources: {runner: ray}\n", "resources.runner"),
    ("grid: [1, 2\n", ".yaml:3:1: not valid YAML (expected ',' or ']', but got '<stream end>', while parsing a "
                       "flow sequence that starts at line 2)"),
    ("- just a list\n", "expected a mapping"),
])
def test_malformed_space_exits_2_with_one_line(tmp_path, capsys, text, fragment):
    path = _write(tmp_path, "base_config: phantom\n" + text if not text.startswith("-") else text)
    assert main(["--space", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and str(path) in err[0], err


def test_missing_space_file_and_bad_flags(capsys):
    assert main(["--space", "no_such_space"]) == 2
    assert "not one of search_spaces/" in capsys.readouterr().err
    assert main(["--space", "thresholds", "--num-samples", "0"]) == 2
    assert main(["--space", "thresholds", "--data-root", "/no/such/dir"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_only_and_skip_select_grid_points(capsys):
    from orchestrator.sweep import parser, prepare
    args = parser().parse_args(["--space", "ablation", "--only", "*seed=1338*",
                                "--skip", "*base=mt*", "--skip", "*base=supervised*", "--threads", "1"])
    plan, name = prepare(args)
    assert name == "ablation" and plan.threads_per_worker == 1
    assert [p.values["seed"] for p in plan.points] == [1338] * 4
    assert {p.values["base"] for p in plan.points} == {"bcp"}
    assert plan.total_trials == 4
    # the default: all cores shared by the trials that run at once; a grid point of one trial
    # runs alone (grid points run one after another), so it gets them all
    plan, _ = prepare(parser().parse_args(["--space", "ablation", "--max-concurrent", "2"]))
    assert len(plan.points) == 21 and plan.at_once == 1 and plan.threads_per_worker == (os.cpu_count() or 1)
    plan, _ = prepare(parser().parse_args(["--space", "thresholds", "--max-concurrent", "2"]))
    assert plan.at_once == 2 and plan.threads_per_worker == max(1, (os.cpu_count() or 1) // 2)


def test_a_spaces_own_threads_win_over_the_default_and_the_flag_over_both(tmp_path):
    """`fixed: {threads: 1}` is the space's choice: the default (cores / trials at once) must
    not replace it. The thread count changes a CPU run's float sums, so a trial that quietly
    ran 2 threads differed from the 1-thread run it was compared with (issue 28, item 4)."""
    from orchestrator.sweep import parser, prepare
    space = tmp_path / "t.yaml"
    space.write_text("grid: {labeled: [2], seed: [1]}\nfixed: {threads: 1}\n")
    plan, _ = prepare(parser().parse_args(["--space", str(space)]))
    assert plan.threads_per_worker == 1
    space.write_text("grid: {labeled: [2], seed: [1]}\nphantom_fixed: {threads: 3}\n")
    plan, _ = prepare(parser().parse_args(["--space", str(space)]))
    assert plan.threads_per_worker == 3
    plan, _ = prepare(parser().parse_args(["--space", str(space), "--threads", "2"]))
    assert plan.threads_per_worker == 2


def test_plan_counts_iterations_per_base_and_says_when_concurrency_cannot_apply(capsys, acdc_phantom):
    # acdc_cpu: pretrain 500 + 1000 iterations for bcp; supervised and mt have no pre-training
    assert main(["--space", "ablation", "--data-root", str(acdc_phantom), "--max-concurrent", "2",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "iteration budget: 1000-1500 per trial, " + str(3 * (4 * 1500 + 3 * 1000)) + " in total" in out
    assert "1 trial(s) at once" in out and "--max-concurrent 2 applies within a grid point" in out


def test_selection_that_leaves_nothing_exits_2(capsys):
    assert main(["--space", "thresholds", "--only", "labeled=5*", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "leave no grid point" in err and "labeled=3_seed=1337" in err
    assert main(["--space", "thresholds", "--threads", "0", "--dry-run"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_paper_spaces_pack_four_trials_per_gpu(capsys):
    for name in ("paper_acdc", "paper_la"):
        assert main(["--space", name, "--dry-run"]) == 0, name
        out = capsys.readouterr().out
        assert "0.25 GPU per trial" in out and "GPU packing: 4 trial(s) share each GPU" in out and "nvidia-cuda-mps-control -d" in out, name
    assert main(["--space", "thresholds", "--dry-run"]) == 0
    assert "GPU packing" not in capsys.readouterr().out


@pytest.mark.parametrize("pair, fragment", [
    ("tau_l=2", "--set tau_l: search_spaces/thresholds.yaml searches tau_l"),
    ("labeled=5", "--set labeled: search_spaces/thresholds.yaml sets labeled per grid point"),
    ("ema_decay=2", "key 'ema_decay': Input should be less than or equal to 1"),
    ("tau_q=0.1", "--set tau_q: unknown parameter"),
])
def test_set_cannot_fight_the_search_or_grid(capsys, pair, fragment):
    assert main(["--space", "thresholds", "--set", pair, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment.split("search_spaces/")[0] in err[0], err
    assert fragment.split("search_spaces/thresholds.yaml")[-1] in err[0], err
    assert main(["--space", "thresholds", "--set", "iters=10", "--dry-run"]) == 0
    assert "iteration budget: 30 per trial" in capsys.readouterr().out


def test_mlflow_ui_port_is_free(monkeypatch):
    import socket
    from orchestrator.sweep import free_port
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", 5000))
        except OSError:
            pass  # 5000 is taken already: free_port must avoid it either way
        port = free_port()
        assert port != 5000
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize("resources, where", [
    ("{workers: 1}", "the loop runs in each Tune trial"),
    ("{workers: 1, runner: train}", "each trial runs under a Ray Train TorchTrainer (runner: train)"),
    ("{workers: 2}", "each trial runs under a Ray Train TorchTrainer (DDP)"),
])
def test_the_plan_says_where_a_trial_runs_its_loop(tmp_path, capsys, resources, where):
    path = _write(tmp_path, f"base_config: phantom\ngrid: {{labeled: [2]}}\nresources: {resources}\n")
    assert main(["--space", str(path), "--dry-run"]) == 0
    assert where in capsys.readouterr().out


def test_only_a_one_worker_trial_runs_its_loop_in_the_tune_trial():
    from orchestrator.space import Resources

    assert Resources().loop_in_trial
    assert not Resources(runner="train").loop_in_trial
    assert not Resources(workers=2).loop_in_trial  # DDP needs Ray Train's worker group


def test_the_plan_shares_one_pretraining_per_seed_and_label_count():
    from orchestrator import pretrainings
    space, path = load_space("ablation")
    plan = make_plan(space, path, None, None, 1, 2)
    keys, points, own = pretrainings.plan(plan)
    # 3 seeds x 4 bcp rows; supervised and the two mt rows have no pre-training stage
    assert len(keys) == 3 and len(points) == 12 and own == []
    assert {keys[h]["seed"] for h in keys} == {1337, 1338, 1339}
    for seed in (1337, 1338, 1339):
        assert len({h for p, h in points.items() if f"seed={seed}_" in p}) == 1
    text = "\n".join(pretrainings.describe(keys, points, own, plan.trials_per_point))
    assert "3 shared" in text and "12 trial(s) forked" in text and "-> 4 trial(s)" in text


def test_a_searched_pretraining_setting_or_ddp_trials_pretrain_themselves(tmp_path):
    from orchestrator import pretrainings
    import yaml
    for extra, why in (({"search": {"lr": {"type": "uniform", "low": 0.001, "high": 0.1}}}, "the search changes"),
                       ({"resources": {"workers": 2}}, "under Ray Train"),
                       ({"shared_pretraining": False}, "shared_pretraining is off")):
        spec = {"base_config": "phantom", "grid": {"labeled": [2]}, **extra}
        f = tmp_path / "s.yaml"
        f.write_text(yaml.safe_dump(spec))
        space, path = load_space(str(f))
        keys, points, own = pretrainings.plan(make_plan(space, path, None, None, 1, 4))
        assert keys == {} and points == {} and len(own) == 1 and why in own[0], own


def test_a_dry_run_checks_the_data(tmp_path, capsys):
    """The plan and then the data checks of a real run (seconds): a folder that is no dataset
    is refused by name, exit 2, before anything starts."""
    assert main(["--space", "ablation", "--data-root", str(ROOT), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train_slices.list" in err or str(ROOT) in err, err


@pytest.mark.parametrize("search, message", [
    ({"rampup_iters": {"type": "int", "low": 0, "high": 10, "step": 0}}, "search.rampup_iters.step"),
    ({"rampup_iters": {"type": "uniform", "low": 0, "high": 10}}, "an integer key takes type: int or categorical"),
    ({"url": {"type": "uniform", "low": 0, "high": 1}}, "a bool key takes type: categorical"),
    ({"crl_mode": {"type": "int", "low": 0, "high": 1}}, "a choice key takes type: categorical"),
    ({"seed": {"type": "int", "low": 1, "high": 3}}, "seed is also set by the grid"),
    ({"tau_l": {"type": "uniform", "low": 0.1, "high": 0.9}}, "tau_l is also set by the grid"),
])
def test_a_search_that_does_not_fit_its_key_or_the_grid_is_refused_before_ray(tmp_path, capsys, search, message):
    import yaml
    spec = {"base_config": "phantom", "grid": {"labeled": [2], "switches": [{"tau_l": 0.5}]}, "search": search}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(spec))
    assert main(["--space", str(f), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
