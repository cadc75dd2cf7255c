"""Paper tables from an MLflow store: values traced back to the runs they came from."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator.names import mlflow_key
from orchestrator.tables import main
from tests.conftest import mlflow_store

METHODS = {"Supervised": ("supervised", False, False), "BCP": ("bcp", False, False),
           "BCP+URL": ("bcp", True, False), "BUARL": ("bcp", True, True)}


def _log(client, run: str, params: dict, metrics: dict, tags: dict | None = None) -> None:
    """One write per run (MLflow's log_batch), as a trial's many values would be."""
    from mlflow.entities import Metric, Param, RunTag
    client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])


PAPER = {"data_root": "/data/ACDC", "image_size": 256, "batch_size": 24, "pretrain_iters": 10000, "iters": 30000}


@pytest.fixture
def store(tmp_path, request):
    """A synthetic experiment: 4 methods x 2 seeds at labeled=3, plus a duplicated trial,
    an unfinished run and a searched trial that loses on validation."""
    from mlflow.tracking import MlflowClient
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("abl", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"buarl.role": "sweep", "buarl.sweep": "abl"}).info.run_id
    client.log_param(parent, "command", "buarl-sweep --space ablation")
    client.set_terminated(parent)
    rng = np.random.default_rng(0)
    truth = {}

    def add(trial, method, seed, dice, val, status="FINISHED", tau=0.5):
        base, url, crl = METHODS[method]
        run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": trial,
                                           "mlflow.parentRunId": parent}).info.run_id
        protocol = dict(getattr(request, "param", PAPER))
        tags = {**protocol.pop("_tags", {}), "buarl.code_digest": f"digest-{trial}"}  # as a sweep tags them
        params = {"base": base, "url": url, "crl": crl, "labeled": 3, "seed": seed, "dataset": "acdc",
                  "tau_l": tau, "rampup_iters": 100 * len(method), "class_names": ["organ", "lesion"],
                  **protocol}  # rampup_iters: a per-method setting
        metrics = {"test_dice": dice, "test_jaccard": dice * 0.8, "test_hd95": 10 - 5 * dice,
                   "test_asd": 2 - dice, "best_val_dice": val, "test_empty_predictions": 3 * seed,
                   "train_frac_high": tau / 10,
                   # per-class Dice under a dataset's own class names (a prepared dataset's)
                   "test_dice_lesion": dice * 0.9, "test_dice_organ": dice * 1.1}
        # seed 2's runs under MLflow's sectioned keys (val/best_dice), seed 1's under the flat
        # ones of stores written before them: the tables read both, in one experiment
        _log(client, run, params, {mlflow_key(k) if seed == 2 else k: v for k, v in metrics.items()}, tags)
        client.set_terminated(run, status=status)

    for i, method in enumerate(METHODS):
        for seed in (1, 2):
            dice = 0.5 + 0.1 * i + 0.01 * seed + rng.uniform(0, 0.01)
            truth[(method, seed)] = dice
            add(f"{method}-{seed}", method, seed, dice, val=dice)
    add("BUARL-1", "BUARL", 1, truth[("BUARL", 1)], truth[("BUARL", 1)])  # the same trial logged twice
    add("BUARL-x", "BUARL", 1, 0.99, 0.99, status="KILLED")               # never finished
    add("BUARL-s", "BUARL", 2, 0.95, 0.01, tau=0.9)                       # worse on validation
    # A sweep that never finished a trial is not among the commands behind the tables.
    stopped = client.create_run(exp, tags={"buarl.role": "sweep", "buarl.sweep": "stopped"}).info.run_id
    client.log_param(stopped, "command", "buarl-sweep --space ablation --name stopped")
    client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": "BCP-z", "mlflow.parentRunId": stopped})
    client.set_terminated(stopped, status="KILLED")
    return uri, truth


def test_tables_trace_back_to_runs(store, tmp_path):
    uri, truth = store
    out = tmp_path / "tables"
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    for stem in ("comparison", "ablation"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0
    nums = pd.read_csv(out / "comparison.csv").set_index("method")
    for method in METHODS:
        values = [truth[(method, s)] * 100 for s in (1, 2)]
        assert nums.loc[method, "dice_mean"] == pytest.approx(np.mean(values))
        assert nums.loc[method, "dice_std"] == pytest.approx(np.std(values, ddof=1))
        assert nums.loc[method, "n_seeds"] == 2  # duplicate, KILLED and val-losing runs not counted
        assert nums.loc[method, "dice_lesion_mean"] == pytest.approx(np.mean(values) * 0.9)
    # per-class columns in the dataset's order (its class_names), not MLflow's alphabetical one
    assert [c for c in nums.columns if c.startswith("dice_") and c != "dice_mean" and c != "dice_std"] == [
        "dice_organ_mean", "dice_lesion_mean"]
    md = (out / "comparison.md").read_text()
    best = max(METHODS, key=lambda m: nums.loc[m, "dice_mean"])
    bold_dice = f"**{nums.loc[best, 'dice_mean']:.2f} ± {nums.loc[best, 'dice_std']:.2f}**"
    assert bold_dice in md and md.count("**") == 2 * 4  # one bold cell per metric column
    assert "BCP (published)" in md and "87.59" in md  # reference row, labelled, from published.csv
    tex = (out / "comparison.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{" in tex
    abl = pd.read_csv(out / "ablation.csv").set_index("method")
    base = [truth[("BCP", s)] * 100 for s in (1, 2)]
    buarl = [truth[("BUARL", s)] * 100 for s in (1, 2)]
    assert abl.loc["BUARL", "Δ Dice vs BCP"] == pytest.approx(np.mean(buarl) - np.mean(base))
    assert pd.isna(abl.loc["BUARL", "p (paired t)"])  # 2 seeds: no test
    assert "n/a" in (out / "ablation.md").read_text()
    assert "**" not in (out / "comparison.csv").read_text() and "±" not in (out / "comparison.csv").read_text()
    assert abl.loc["BUARL", "URL"] == "✓" and abl.loc["BUARL", "CRL"] == "✓"
    assert pd.isna(abl.loc["BCP", "Δ Dice vs BCP"])
    # empty predictions travel with the row (mean over the chosen seeds' runs: 3 and 6)
    assert abl.loc["BUARL", "empty preds"] == pytest.approx(4.5) and nums.loc["BCP", "empty_predictions_mean"] == 4.5
    assert (out / "sensitivity_tau_l.png").exists() and (out / "parallel.png").exists()
    assert not (out / "sensitivity_rampup_iters.png").exists()  # differs only between methods
    text = (out / "README.md").read_text()
    assert "buarl-sweep --space ablation`" in text and "--name stopped" not in text
    listed = pd.read_csv(out / "trials.csv")
    assert len(listed) == 9 and listed["in_tables"].sum() == 8  # the val-losing searched trial is listed, not used
    assert not listed.loc[listed["in_tables"], "run_id"].duplicated().any()
    assert set(listed.loc[listed["method"] == "BCP", "code_digest"]) == {"digest-BCP-1", "digest-BCP-2"}
    assert sorted(listed["frac_high"].unique()) == pytest.approx([0.05, 0.09])  # tau 0.5 and 0.9 trials
    assert list(listed["test_dice_organ"]) == pytest.approx(list(listed["test_dice"] * 1.1))
    assert "test_dice_RV" not in listed


def test_mostly_empty_row_never_wins_a_distance_column(store, tmp_path):
    """A model that predicts nothing scores 95HD/ASD 0 under the reference policy: it is
    shown with a dagger, and the bold goes to the best row that predicted something."""
    from mlflow.tracking import MlflowClient
    uri, truth = store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("abl").experiment_id
    for seed, (missed, hd) in {1: (18, 0.2), 2: (11, 0.4)}.items():  # 29 of 40 present structures missed
        run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": f"mt-{seed}"}).info.run_id
        _log(client, run, {"base": "mt", "url": False, "crl": False, "labeled": 3, "seed": seed, "dataset": "acdc"},
             {"test_dice": 0.01, "test_jaccard": 0.01, "test_hd95": hd, "test_asd": hd / 2,
              "best_val_dice": 0.01, "test_empty_predictions": missed, "test_structures": 20})
        client.set_terminated(run)
    # The MSE form of MT is its own row; the runs above predate the switch (no param): pseudo.
    run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": "mt-mse-1"}).info.run_id
    _log(client, run, {"base": "mt", "mt_consistency": "mse", "url": False, "crl": False, "labeled": 3, "seed": 1,
                       "dataset": "acdc"},
         {"test_dice": 0.4, "test_jaccard": 0.3, "test_hd95": 9.0, "test_asd": 3.0, "best_val_dice": 0.4,
          "test_empty_predictions": 0, "test_structures": 20})
    client.set_terminated(run)
    out = tmp_path / "t"
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    nums = pd.read_csv(out / "comparison.csv").set_index("method")
    assert nums.loc["MT", "n_seeds"] == 2 and nums.loc["MT-MSE", "n_seeds"] == 1
    assert nums.loc["MT-MSE", "dice_mean"] == pytest.approx(40.0)
    assert nums.loc["MT", "missed_share_mean"] == pytest.approx((18 / 20 + 11 / 20) / 2)
    assert pd.isna(nums.loc["BCP", "missed_share_mean"])  # runs without the count are not judged
    rows = {}
    for line in (out / "comparison.md").read_text().splitlines()[2:]:  # the display: | method | Dice | Jaccard | 95HD | ASD |
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    assert rows["MT"][2] == "0.30 ± 0.14 †"
    buarl = [10 - 5 * truth[("BUARL", s)] for s in (1, 2)]  # the smallest 95HD of the other rows
    assert rows["BUARL"][2] == f"**{np.mean(buarl):.2f} ± {np.std(buarl, ddof=1):.2f}**"
    assert rows["MT"][0] == "1.00 ± 0.00"  # Dice is not flagged
    assert "†" in (out / "README.md").read_text()


def test_missing_experiment_is_exit_2(store, tmp_path, capsys):
    uri, _ = store
    assert main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "x")]) == 2
    assert "experiment 'nope' not found" in capsys.readouterr().err
    assert main(["--experiment", "abl", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2


def test_experiments_of_one_protocol_pool(store, tmp_path, capsys):
    """A continuation sweep under another space name adds its seeds; each trial counts once."""
    from mlflow.tracking import MlflowClient
    uri, truth = store
    client = MlflowClient(uri)
    exp = client.create_experiment("abl_more", artifact_location=(tmp_path / "art2").as_uri())
    for method, dice in (("BCP", 0.40), ("BUARL", 0.70)):
        base, url, crl = METHODS[method]
        run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": f"more-{method}"}).info.run_id
        _log(client, run, {"base": base, "url": url, "crl": crl, "labeled": 3, "seed": 3, "dataset": "acdc"},
             dict.fromkeys(("test_dice", "test_jaccard", "test_hd95", "test_asd", "best_val_dice"), dice))
        client.set_terminated(run)
    out = tmp_path / "pooled"
    assert main(["--experiment", "abl", "--experiment", "abl_more", "--tracking-uri", uri, "--out", str(out)]) == 0
    nums = pd.read_csv(out / "comparison.csv").set_index("method")
    assert nums.loc["BCP", "n_seeds"] == 3 and nums.loc["Supervised", "n_seeds"] == 2
    bcp = [truth[("BCP", s)] * 100 for s in (1, 2)] + [40.0]
    assert nums.loc["BCP", "dice_mean"] == pytest.approx(np.mean(bcp))
    buarl = [truth[("BUARL", s)] * 100 for s in (1, 2)] + [70.0]
    abl = pd.read_csv(out / "ablation.csv").set_index("method")
    assert abl.loc["BUARL", "p (paired t)"] == pytest.approx(stats.ttest_rel(buarl, bcp).pvalue)
    assert "`abl` + `abl_more`" in (out / "README.md").read_text()
    assert main(["--experiment", "abl", "--experiment", "gone", "--tracking-uri", uri, "--out", str(out)]) == 2
    assert "experiment 'gone' not found" in capsys.readouterr().err


PHANTOM = {"data_root": "/c/phantom-acdc-c8-s0", "image_size": 64, "batch_size": 8, "pretrain_iters": 20,
           "iters": 60}


@pytest.mark.parametrize("store, protocol, data, ratio", [
    ({**PHANTOM, "_tags": {"buarl.data": "ACDC phantom", "buarl.synthetic": "true", "buarl.train_cases": "8"}},
     "phantom", "ACDC phantom (built-in, synthetic, 8 training cases; not real scans)", "3 of 8 patients (37.5 %)"),
    ({**PHANTOM, "data_root": None}, "phantom", "ACDC phantom (built-in, synthetic; not real scans)", "3 patients,"),
    ({"data_root": "/d/ACDC", "image_size": 128, "batch_size": 16, "pretrain_iters": 500, "iters": 1000}, "acdc_cpu",
     "ACDC at `/d/ACDC`", "3 patients (5%)")], indirect=["store"])
def test_tables_name_their_protocol_and_show_published_numbers_only_beside_the_papers(store, tmp_path, protocol, data,
                                                                                      ratio):
    uri, _ = store
    out = tmp_path / "tables"
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    assert f"{ratio}{',' if not ratio.endswith(',') else ''} {protocol}" in md
    assert "(published)" not in md and "87.59" not in md
    readme = (out / "README.md").read_text()
    assert f"data: {data}; protocol: `{protocol}`; no published numbers beside them" in readme
    # every table, CSV row and figure names its data; a phantom's share is never the benchmark's
    name = data.split(" (")[0].split(" at ")[0]
    assert md.startswith(f"Data: {name}") and (out / "comparison.tex").read_text().startswith(f"% data: {name}")
    for csv in ("comparison.csv", "ablation.csv", "trials.csv"):
        assert set(pd.read_csv(out / csv)["data"]) == {name}, csv
    if "phantom" in name:
        assert "(5%)" not in md and "(10%)" not in md


def test_paper_protocol_tables_say_so(store, tmp_path):
    uri, _ = store
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(tmp_path / "t")]) == 0
    assert "3 patients (5%), acdc" in (tmp_path / "t" / "comparison.md").read_text()
    assert "protocol: `acdc`; published numbers" in (tmp_path / "t" / "README.md").read_text()


def test_tables_and_export_never_import_ray(store, tmp_path):
    import subprocess
    import sys
    uri, _ = store
    code = ("import sys; from orchestrator.tables import main; import orchestrator.export; "
            f"rc = main(['--experiment', 'abl', '--tracking-uri', {uri!r}, '--out', {str(tmp_path / 'o')!r}]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_latex_groups_and_aligns_numbers(store, tmp_path):
    uri, _ = store
    out = tmp_path / "t"
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    tex = (out / "comparison.tex").read_text()
    assert r"\begin{tabular}{lrrrr}" in tex and r"\cmidrule(lr){2-5}" in tex
    abl = (out / "ablation.tex").read_text()
    assert r"\begin{tabular}{r" in abl  # labeled (a number) right-aligned


@pytest.fixture
def paired_store(tmp_path):
    """BCP and two named rows over 5 seeds at labeled=3, both checkpoints logged; a 6th seed
    that BCP lacks (unpaired: not counted)."""
    from mlflow.tracking import MlflowClient
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("ev", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"buarl.role": "sweep", "buarl.sweep": "ev"}).info.run_id
    client.set_terminated(parent)
    dice = {"BCP": [0.60, 0.55, 0.62, 0.58, 0.57],
            "BUARL": [0.62, 0.54, 0.66, 0.61, 0.60, 0.99],
            "BUARL tuned": [0.65, 0.60, 0.63, 0.64, 0.61]}
    for row, values in dice.items():
        for seed, d in enumerate(values, start=1):
            run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": f"{row}-{seed}",
                                               "mlflow.parentRunId": parent, "buarl.row": row}).info.run_id
            _log(client, run, {"base": "bcp", "url": row != "BCP", "crl": row != "BCP", "labeled": 3, "seed": seed,
                               "dataset": "acdc", **PAPER},
                 {"test_dice": d, "test_jaccard": d, "test_hd95": 1.0, "test_asd": 1.0,
                  "best_val_dice": d, "test_last_dice": d - 0.1, "test_last_jaccard": d,
                  "test_last_hd95": 1.0, "test_last_asd": 1.0, "train_frac_high": 0.25,
                  "train_crl_share": 0.8})
            client.set_terminated(run)
    return uri, dice


def test_paired_table_holds_the_differences_over_common_seeds(paired_store, tmp_path):
    uri, dice = paired_store
    out = tmp_path / "t"
    assert main(["--experiment", "ev", "--tracking-uri", uri, "--out", str(out)]) == 0
    table = pd.read_csv(out / "paired.csv").set_index("method")
    assert set(table.index) == {"BUARL", "BUARL tuned"}  # named rows from the buarl.row tag
    diff = np.array(dice["BUARL"][:5]) * 100 - np.array(dice["BCP"]) * 100  # seed 6 has no BCP pair
    row = table.loc["BUARL"]
    assert row["n_seeds"] == 5 and row["wins"] == 4
    assert row["Δ mean"] == pytest.approx(diff.mean()) == pytest.approx(2.2)
    half = stats.t.ppf(0.975, 4) * diff.std(ddof=1) / np.sqrt(5)
    assert (row["CI low"], row["CI high"]) == (pytest.approx(diff.mean() - half), pytest.approx(diff.mean() + half))
    assert row["p (paired t)"] == pytest.approx(stats.ttest_1samp(diff, 0).pvalue)
    # exact signed-rank test, 5 pairs: ranks of |d| = 2, 1, 4, 3, 3 -> W- = 1
    assert row["p (Wilcoxon)"] == pytest.approx(stats.wilcoxon(diff).pvalue)
    assert row["crl_share"] == pytest.approx(0.8) and row["frac_high"] == pytest.approx(0.25)
    assert table.loc["BUARL tuned", "wins"] == 5
    assert (out / "forest.png").stat().st_size > 1000
    assert "best-on-validation checkpoint" in (out / "README.md").read_text()
    # the last iterate: every test value 0.1 lower, so the same differences, other means
    last = tmp_path / "l"
    assert main(["--experiment", "ev", "--tracking-uri", uri, "--out", str(last), "--checkpoint", "last"]) == 0
    lrow = pd.read_csv(last / "paired.csv").set_index("method").loc["BUARL"]
    assert lrow["Δ mean"] == pytest.approx(2.2) and lrow["BCP Dice"] == pytest.approx(row["BCP Dice"] - 10)
    assert "last iterate" in (last / "README.md").read_text()


def test_last_checkpoint_tables_refuse_runs_without_last_iterate_metrics(store, tmp_path, capsys):
    uri, _ = store
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(tmp_path / "x"),
                 "--checkpoint", "last"]) == 2
    assert "have no last-iterate test metrics" in capsys.readouterr().err


def test_sensitivity_ranks_each_searched_setting_against_validation(tmp_path):
    """A search's trials: validation Dice per reading value (median, range) and its rank
    correlation with each searched number and dose column, from hand-set values."""
    from mlflow.tracking import MlflowClient
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    # val rises with tau_l (rho 1), falls with the CRL share (rho -1); lambda_url is fixed (not searched)
    for i, (tau, mode, val) in enumerate([(0.1, "weight", 0.5), (0.2, "weight", 0.6), (0.3, "term", 0.7),
                                          (0.4, "term", 0.9)]):
        run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": f"t{i}"}).info.run_id
        _log(client, run, {"base": "bcp", "url": True, "crl": True, "labeled": 3, "seed": 1, "dataset": "acdc",
                           "tau_l": tau, "url_mode": mode, "lambda_url": 1.0, **PAPER},
             {"test_dice": val, "test_jaccard": val, "test_hd95": 1.0, "test_asd": 1.0, "best_val_dice": val,
              "train_crl_share": 1 - tau})
        client.set_terminated(run)
    out = tmp_path / "t"
    assert main(["--experiment", "s", "--tracking-uri", uri, "--out", str(out)]) == 0
    sens = pd.read_csv(out / "sensitivity.csv")
    modes = sens[sens["setting"] == "url_mode"].set_index("value")
    assert modes.loc["weight", "trials"] == 2 and modes.loc["weight", "val Dice median"] == pytest.approx(55.0)
    assert modes.loc["term", "val Dice min"] == pytest.approx(70.0) and modes.loc["term", "val Dice max"] == pytest.approx(90.0)
    rho = sens[sens["value"] == "rank correlation"].set_index("setting")["Spearman ρ"]
    assert rho["tau_l"] == pytest.approx(1.0) and rho["crl_share"] == pytest.approx(-1.0)
    assert "lambda_url" not in rho and "sensitivity.md" in (out / "README.md").read_text()
