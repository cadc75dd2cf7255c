"""`buarl-tables --experiment NAME`: paper tables and plots from MLflow runs, never by hand.

runs (mlflow.search_runs -> pandas) -> one FINISHED run per trial -> one run per
(method, labeled, seed): the trial with the best validation metric -> tables:
  comparison: methods x label ratio, Dice % / Jaccard % / 95HD / ASD, mean ± std over seeds,
              best of ours in bold, published numbers in their own labelled rows;
  ablation:   URL / CRL marks over the BCP base, gain over the base row, paired t-test;
  paired:     every row against BCP over the seeds both ran: mean paired difference with its
              95 % interval, paired t and Wilcoxon signed-rank tests, the dose; forest plot;
  sensitivity: val/test Dice against each searched parameter; parallel coordinates.
Test metrics are those of the best-on-validation checkpoint (BCP's way), or with
`--checkpoint last` of the last iterate; every output says which.
Each table as Markdown, LaTeX (booktabs) and CSV, with a README naming the sweep command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from buarl.errors import BuarlError  # noqa: E402
from orchestrator.names import flat_metrics  # noqa: E402

METRICS = [("dice", "Dice %", 100.0, "max"), ("jaccard", "Jaccard %", 100.0, "max"),
           ("hd95", "95HD", 1.0, "min"), ("asd", "ASD", 1.0, "min")]
SEARCHABLE = ["tau_l", "tau_u", "lambda_url", "lambda_crl", "ema_decay", "rampup_iters"]
READINGS = ["region_mode", "url_mode", "crl_mode"]  # categorical switches, listed per trial
# the dose: share of labeled pixels URL up-weights, of unlabeled pixels under tau_u, and the
# mean share of a pseudo-label CRL keeps (each the last log window's mean)
DOSE = {"metrics.train_frac_high": "frac_high", "metrics.train_frac_low": "frac_low",
        "metrics.train_crl_share": "crl_share"}
CHECKPOINTS = {"best": "best-on-validation checkpoint", "last": "last iterate"}
METHOD_ORDER = ["Supervised", "MT", "MT+URL", "MT+CRL", "MT+URL+CRL",
                "MT-MSE", "MT-MSE+URL", "MT-MSE+CRL", "MT-MSE+URL+CRL", "BCP", "BCP+URL", "BCP+CRL", "BUARL"]
PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "reference" / "published.csv"
RATIO = {"acdc": {3: "5%", 7: "10%", 14: "20%", 70: "100%"}, "la": {4: "5%", 8: "10%", 16: "20%", 80: "100%"}}


class TablesError(BuarlError):
    pass


def method_name(base: str, url: bool, crl: bool, mt_consistency: str = "pseudo") -> str:
    if base == "supervised":
        return "Supervised"
    if base == "bcp" and url and crl:
        return "BUARL"
    name = base.upper() + ("-MSE" if base == "mt" and mt_consistency == "mse" else "")
    return name + ("+URL" if url else "") + ("+CRL" if crl else "")


def _bool(v) -> bool:
    return str(v).lower() in ("true", "1")


def search(experiments: list[str], tracking_uri: str) -> pd.DataFrame:
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(tracking_uri)
    for name in experiments:
        if MlflowClient(tracking_uri).get_experiment_by_name(name) is None:
            raise TablesError(f"experiment {name!r} not found in {tracking_uri}")
    return flat_metrics(mlflow.search_runs(experiment_names=list(experiments)))


def trial_runs(runs: pd.DataFrame, experiments: list[str]) -> pd.DataFrame:
    """One row per trial: FINISHED runs only, a trial logged twice counted once."""
    what = " + ".join(repr(e) for e in experiments)
    if runs.empty or "tags.buarl.role" not in runs:
        raise TablesError(f"experiment {what} has no trial runs")
    trials = runs[(runs["tags.buarl.role"] == "trial") & (runs["status"] == "FINISHED")].copy()
    if trials.empty:
        raise TablesError(f"experiment {what} has no FINISHED trial runs")
    trials = trials.sort_values("end_time").drop_duplicates("tags.buarl.trial_id", keep="last")
    # A run without the param was logged by code that knew only the pseudo-label form.
    consistency = trials.get("params.mt_consistency", pd.Series("pseudo", index=trials.index)).fillna("pseudo")
    trials["method"] = [method_name(b, _bool(u), _bool(c), m) for b, u, c, m in
                        zip(trials["params.base"], trials["params.url"], trials["params.crl"], consistency)]
    if "tags.buarl.row" in trials:  # a grid switch's own row name (space.ROW) wins
        named = trials["tags.buarl.row"].notna() & (trials["tags.buarl.row"].astype(str) != "")
        trials.loc[named, "method"] = trials.loc[named, "tags.buarl.row"]
    trials["labeled"] = trials["params.labeled"].astype(int)
    trials["seed"] = trials["params.seed"].astype(int)
    trials["dataset"] = trials["params.dataset"]
    # What they trained on, as the sweep tagged it (buarl.data.origin); runs from before the
    # tag: the built-in phantom has no data root or one in the phantom cache.
    roots = trials.get("params.data_root", pd.Series("", index=trials.index)).astype(str)
    guessed = roots.isin(["None", "nan", ""]) | roots.str.contains("/phantom-(?:acdc|la)-", regex=True)
    tagged = trials.get("tags.buarl.synthetic", pd.Series(np.nan, index=trials.index))
    trials["synthetic"] = tagged.isin(["true"]) | (~tagged.isin(["true", "false"]) & guessed)
    names = trials["dataset"].str.upper() + np.where(trials["synthetic"], " phantom", "")
    tagged_name = trials.get("tags.buarl.data", pd.Series(None, index=trials.index, dtype=object)).astype(object)
    trials["data"] = tagged_name.where(tagged_name.notna(), names)
    trials["train_cases"] = pd.to_numeric(trials.get("tags.buarl.train_cases", pd.Series(np.nan, index=trials.index)),
                                          errors="coerce")
    return trials


def data_of(trials: pd.DataFrame) -> tuple[str, int | None]:
    """(the data's name, its training cases if it is synthetic, else None; 0: synthetic, count
    not recorded): a phantom's label ratios are shares of its own cases, never the
    benchmark's published percentages."""
    name = " + ".join(dict.fromkeys(trials["data"].astype(str)))
    if not trials["synthetic"].any():
        return name, None
    cases = trials["train_cases"].dropna()
    return name, int(cases.iloc[0]) if len(cases) else 0


PAPER_PROTOCOLS = ("acdc", "la")  # the shipped configs that follow the published protocol


def protocol_of(trials: pd.DataFrame) -> str:
    """Which protocol the trials ran: `phantom` without a data root, else the shipped config
    whose size, batch and schedule they match (acdc, acdc_cpu, la, la_cpu), else `custom`."""
    from buarl.config import SHIPPED, base_values
    roots = trials.get("params.data_root", pd.Series(dtype=object)).astype(str)
    if roots.isin(["None", "nan", ""]).all():
        return "phantom"
    keys = ("image_size", "patch_size", "batch_size", "pretrain_iters", "iters")
    found = set()
    for _, row in trials.iterrows():
        match = "custom"
        for name in SHIPPED:
            v = base_values(name)
            if v.get("dataset") == row.get("params.dataset") and all(
                    str(v[k]).replace(" ", "") == str(row.get(f"params.{k}", "")).replace(" ", "")
                    for k in keys if k in v and pd.notna(row.get(f"params.{k}"))  # (not logged: not read)
                    and (k != "image_size" or v["dataset"] == "acdc")
                    and (k != "patch_size" or v["dataset"] == "la")):
                match = name
                break
        found.add(match)
    return found.pop() if len(found) == 1 else "mixed (" + ", ".join(sorted(found)) + ")"


def best_per_seed(trials: pd.DataFrame, metric: str = "metrics.best_val_dice") -> pd.DataFrame:
    """A searched sweep has many trials per (method, labeled, seed): keep the best on validation."""
    order = trials.sort_values(metric, ascending=False, na_position="last")
    return order.drop_duplicates(["method", "labeled", "seed"], keep="first")


def ratio_label(dataset: str, labeled: int, cases: int | None = None) -> str:
    """`3 patients (5%)` on the benchmark (its published share); on a phantom of `cases`
    training cases, the share of those: `3 of 8 patients (37.5 %)` (cases 0: `3 patients`)."""
    unit = "patients" if dataset == "acdc" else "scans"
    if cases is not None:
        return f"{labeled} of {cases} {unit} ({100 * labeled / cases:.3g} %)" if cases else f"{labeled} {unit}"
    pct = RATIO.get(dataset, {}).get(labeled)
    return f"{labeled} {unit}" + (f" ({pct})" if pct else "")


def group_label(dataset: str, labeled: int, protocol: str, cases: int | None = None) -> str:
    label = ratio_label(dataset, labeled, cases)
    return f"{label}, {protocol}" if protocol else label


def empty_predictions(g: pd.DataFrame) -> float:
    """What the paper layout hides: the reference policy scores a missed structure's 95HD/ASD
    as 0, which flatters them, so the mean count of empty (case, class) predictions goes along."""
    col = "metrics.test_empty_predictions"
    return g[col].astype(float).mean() if col in g else np.nan


def missed_share(g: pd.DataFrame) -> float:
    """Mean share of present structures predicted empty (NaN for runs that predate the count)."""
    if "metrics.test_structures" not in g or "metrics.test_empty_predictions" not in g:
        return np.nan
    return (g["metrics.test_empty_predictions"].astype(float) / g["metrics.test_structures"].astype(float)).mean()


# Above this share of missed structures a row's 95HD / ASD mean consists mostly of the
# reference policy's 0 placeholders: shown with a dagger, never bolded as the best.
DEGENERATE = 0.5


def class_dice_columns(trials: pd.DataFrame) -> dict[str, str]:
    """{`metrics.test_dice_<class>`: class} for the classes the runs report, in the dataset's
    order (RV, Myo, LV on ACDC; a prepared dataset's `class_names` param, from its dataset.yaml)."""
    import ast

    from buarl.config import BENCHMARK_CLASSES
    prefix = "metrics.test_dice_"
    found = {c[len(prefix):]: c for c in trials.columns if c.startswith(prefix) and trials[c].notna().any()}
    named = trials.get("params.class_names", pd.Series(dtype=object)).dropna()
    order = (ast.literal_eval(named.iloc[0]) if len(named) else []) + sum(BENCHMARK_CLASSES.values(), [])
    ranked = sorted(found, key=lambda n: order.index(n) if n in order else len(order))
    return {found[n]: n for n in ranked}


def comparison(chosen: pd.DataFrame, published: pd.DataFrame | None,
               protocol: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numbers, display): numbers has mean/std/n per method x labeled x metric. The column
    groups name the protocol; published numbers join only runs of the paper protocol."""
    rows = []
    name, cases = data_of(chosen)
    per_class = class_dice_columns(chosen)
    for (method, labeled), g in chosen.groupby(["method", "labeled"]):
        row = {"method": method, "labeled": labeled, "dataset": g["dataset"].iloc[0], "data": name,
               "n_seeds": len(g), "source": "ours"}
        for key, _, scale, _ in METRICS:
            values = g[f"metrics.test_{key}"].astype(float) * scale
            # one seed has no spread: no std (NaN, an empty CSV cell), not 0.0
            row[f"{key}_mean"], row[f"{key}_std"] = values.mean(), values.std(ddof=1) if len(values) > 1 else np.nan
        for col, cls in per_class.items():
            row[f"dice_{cls}_mean"] = g[col].astype(float).mean() * 100
        row["empty_predictions_mean"] = empty_predictions(g)
        row["missed_share_mean"] = missed_share(g)
        rows.append(row)
    numbers = pd.DataFrame(rows)
    numbers["order"] = numbers["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(99)
    numbers = numbers.sort_values(["labeled", "order"]).drop(columns="order")
    dataset = numbers["dataset"].iloc[0]
    labels = sorted(numbers["labeled"].unique())
    display = pd.DataFrame(index=pd.Index(list(dict.fromkeys(numbers["method"])), name="Method"))
    for labeled in labels:
        part = numbers[numbers["labeled"] == labeled].set_index("method")
        for key, title, _, better in METRICS:
            col = (group_label(dataset, labeled, protocol, cases), title)
            flagged = part["missed_share_mean"] > DEGENERATE if better == "min" else pd.Series(False, part.index)
            means = part.loc[~flagged, f"{key}_mean"]
            best = means.max() if better == "max" else means.min()
            cells = {}
            for m, r in part.iterrows():
                text = f"{r[f'{key}_mean']:.2f} ± {r[f'{key}_std']:.2f}" if r["n_seeds"] > 1 else f"{r[f'{key}_mean']:.2f}"
                if flagged[m]:
                    cells[m] = text + " †"
                else:
                    cells[m] = f"**{text}**" if np.isclose(r[f"{key}_mean"], best) else text
            display[col] = pd.Series(cells)
    display.columns = pd.MultiIndex.from_tuples(display.columns)
    display = display.fillna("–")
    if published is not None and protocol in PAPER_PROTOCOLS:
        pub = published[(published["dataset"] == dataset) & (published["labeled"].isin(labels))]
        for method, g in pub.groupby("method", sort=False):
            name = f"{method} (published)"
            display.loc[name] = "–"
            for _, r in g.iterrows():
                for key, title, _, _ in METRICS:
                    v = r.get(key)
                    if pd.notna(v) and str(v) != "":
                        display.loc[name, (group_label(dataset, int(r["labeled"]), protocol), title)] = f"{float(v):.2f}"
    return numbers, display


def ablation(chosen: pd.DataFrame) -> pd.DataFrame:
    from scipy import stats
    bcp = chosen[chosen["params.base"] == "bcp"]
    rows = []
    for labeled, g in bcp.groupby("labeled"):
        base = g[g["method"] == "BCP"].set_index("seed")
        for method in [m for m in ("BCP", "BCP+URL", "BCP+CRL", "BUARL") if m in set(g["method"])]:
            part = g[g["method"] == method].set_index("seed")
            dice = part["metrics.test_dice"].astype(float) * 100
            row = {"labeled": labeled, "URL": "✓" if method in ("BCP+URL", "BUARL") else "",
                   "CRL": "✓" if method in ("BCP+CRL", "BUARL") else "", "method": method, "n_seeds": len(part)}
            for key, title, scale, _ in METRICS:
                row[title] = part[f"metrics.test_{key}"].astype(float).mean() * scale
            row["empty preds"] = empty_predictions(part)
            row["Δ Dice vs BCP"] = np.nan
            row["p (paired t)"] = np.nan
            if not base.empty and method != "BCP":
                common = sorted(set(base.index) & set(part.index))
                base_dice = base["metrics.test_dice"].astype(float) * 100
                row["Δ Dice vs BCP"] = dice.mean() - base_dice.mean()
                if len(common) >= 3:  # a t-test on 2 pairs says nothing
                    row["p (paired t)"] = float(stats.ttest_rel(dice.loc[common], base_dice.loc[common]).pvalue)
            rows.append(row)
    return pd.DataFrame(rows)


def use_checkpoint(trials: pd.DataFrame, checkpoint: str) -> pd.DataFrame:
    """The trials with `metrics.test_*` holding the chosen checkpoint's test metrics: the
    best-on-validation one as logged, or the last iterate's `test_last_*` in their place.
    Trials that predate the last iterate's metrics are refused by name."""
    if checkpoint == "best":
        return trials
    last = [c for c in trials.columns if c.startswith("metrics.test_last_")]
    missing = trials[trials["metrics.test_last_dice"].isna()] if "metrics.test_last_dice" in trials else trials
    if len(missing):
        raise TablesError(f"--checkpoint last: {len(missing)} trial run(s) have no last-iterate test metrics "
                          f"(test_last_dice), e.g. run {missing['run_id'].iloc[0]}: use --checkpoint best")
    out = trials.copy()
    for col in last:
        out["metrics.test_" + col.removeprefix("metrics.test_last_")] = out[col]
    return out


def paired(chosen: pd.DataFrame, reference: str = "BCP") -> pd.DataFrame:
    """Every row against `reference` over the seeds both ran at one label ratio: the mean
    paired difference of test Dice (points) with its 95 % t interval, the paired t-test and
    the Wilcoxon signed-rank test (exact for small n), and each row's dose."""
    from scipy import stats
    rows = []
    for labeled, g in chosen.groupby("labeled"):
        base = g[g["method"] == reference].set_index("seed")["metrics.test_dice"].astype(float) * 100
        if base.empty:
            continue
        for method, part in g[g["method"] != reference].groupby("method", sort=False):
            dice = part.set_index("seed")["metrics.test_dice"].astype(float) * 100
            common = sorted(set(base.index) & set(dice.index))
            diff = (dice.loc[common] - base.loc[common]).to_numpy()
            n = len(diff)
            row = {"labeled": labeled, "method": method, "vs": reference, "n_seeds": n,
                   "Dice": dice.loc[common].mean() if n else np.nan,
                   f"{reference} Dice": base.loc[common].mean() if n else np.nan,
                   "Δ mean": diff.mean() if n else np.nan, "Δ sd": diff.std(ddof=1) if n > 1 else np.nan,
                   "CI low": np.nan, "CI high": np.nan, "p (paired t)": np.nan, "p (Wilcoxon)": np.nan,
                   "wins": int((diff > 0).sum())}
            if n > 1:
                half = stats.t.ppf(0.975, n - 1) * row["Δ sd"] / np.sqrt(n)
                row["CI low"], row["CI high"] = row["Δ mean"] - half, row["Δ mean"] + half
                if row["Δ sd"] > 0:
                    row["p (paired t)"] = float(stats.ttest_rel(dice.loc[common], base.loc[common]).pvalue)
                if np.any(diff != 0):
                    row["p (Wilcoxon)"] = float(stats.wilcoxon(diff).pvalue)
            for col, name in DOSE.items():
                row[name] = part[col].astype(float).mean() if col in part else np.nan
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["order"] = out["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(99)
    return out.sort_values(["labeled", "order", "method"]).drop(columns="order").reset_index(drop=True)


def forest(table: pd.DataFrame, out: Path, checkpoint: str, dataset: str, data: tuple = ("", None)) -> str:
    """forest.png: each row's mean paired difference to the reference with its 95 % interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r.method}, {ratio_label(dataset, r.labeled, data[1])} (n={r.n_seeds})" for r in table.itertuples()]
    y = np.arange(len(table))[::-1]
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.45 * len(table)))
    lo = (table["Δ mean"] - table["CI low"]).fillna(0)
    hi = (table["CI high"] - table["Δ mean"]).fillna(0)
    ax.errorbar(table["Δ mean"], y, xerr=[lo, hi], fmt="o", capsize=4, color="tab:blue")
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"test Dice − {table['vs'].iloc[0]} (points), mean and 95 % interval over seeds")
    ax.set_title(f"{data[0]}: paired over seeds; {CHECKPOINTS[checkpoint]}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "forest.png", dpi=110)
    plt.close(fig)
    return "forest.png"


def trial_list(trials: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """Every counted trial with its MLflow run id, so each table cell can be traced back."""
    cols = {"data": "data", "run_id": "run_id", "tags.buarl.sweep": "sweep", "method": "method", "labeled": "labeled",
            "seed": "seed", **{f"params.{p}": p for p in SEARCHABLE + READINGS},
            "metrics.best_val_dice": "best_val_dice", "metrics.best_step": "best_step",
            **{f"metrics.test_{k}": f"test_{k}" for k, *_ in METRICS},
            **{col: f"test_dice_{cls}" for col, cls in class_dice_columns(trials).items()},
            "metrics.test_empty_predictions": "empty_predictions", "metrics.test_structures": "structures",
            "metrics.test_last_dice": "test_last_dice", **DOSE,
            "metrics.train_seconds": "train_seconds", "tags.buarl.code_digest": "code_digest",
            "tags.buarl.pretrained_run": "pretrained_run"}
    present = {k: v for k, v in cols.items() if k in trials}
    out = trials[list(present)].rename(columns=present)
    # train_seconds restarts with a resumed worker; the run's own span covers the restarts
    out["wall_minutes"] = ((trials["end_time"] - trials["start_time"]).dt.total_seconds() / 60).round(1).values
    out.insert(6, "in_tables", trials["run_id"].isin(chosen["run_id"]).values)
    return out.sort_values(["labeled", "method", "seed"]).reset_index(drop=True)


def _latex_text(v) -> str:
    if not isinstance(v, str):
        return v
    text = v.replace("%", r"\%").replace("±", r"$\pm$").replace("✓", r"\checkmark")
    return r"\textbf{" + text.strip("*") + "}" if text.startswith("**") else text


def write_table(df: pd.DataFrame, out: Path, stem: str, index: bool, csv: bool = True, data: str = "") -> None:
    """CSV (numbers only), Markdown (flat headers) and LaTeX (booktabs) of one table; `data`
    names what the runs trained on, above the Markdown table and in a LaTeX comment."""
    if csv:
        df.to_csv(out / f"{stem}.csv", index=index)
    flat = df.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [" ".join(c) for c in flat.columns]
    for col, fmt, missing in (("Δ Dice vs BCP", "{:+.2f}", "–"), ("p (paired t)", "{:.3f}", "n/a"),
                              ("Δ mean", "{:+.2f}", "–"), ("Δ sd", "{:.2f}", "–"), ("CI low", "{:+.2f}", "–"),
                              ("CI high", "{:+.2f}", "–"), ("p (Wilcoxon)", "{:.3f}", "n/a"),
                              ("frac_high", "{:.3f}", "–"), ("frac_low", "{:.3f}", "–"),
                              ("crl_share", "{:.3f}", "–"), ("p (Spearman)", "{:.3g}", "–")):
        if col in flat:
            flat[col] = flat[col].map(lambda v, f=fmt, m=missing: m if pd.isna(v) else f.format(v))
    flat = flat.map(lambda v: "–" if isinstance(v, float) and np.isnan(v) else f"{v:.2f}" if isinstance(v, float) else v)
    # the cells are formatted above: tabulate must not parse "+2.20" or "0.060" back to numbers
    align = (["left"] if index else []) + ["right" if pd.api.types.is_numeric_dtype(df[c]) or isinstance(
        df.columns, pd.MultiIndex) or c in df.select_dtypes("number") else "left" for c in df.columns]
    caption = f"Data: {data}\n\n" if data else ""
    (out / f"{stem}.md").write_text(caption + flat.to_markdown(index=index, disable_numparse=True, colalign=align) + "\n")
    tex = flat.rename(columns={"Δ Dice vs BCP": r"$\Delta$ Dice vs BCP"}) if not isinstance(df.columns, pd.MultiIndex) \
        else df
    tex = tex.map(_latex_text)
    tex.columns = (pd.MultiIndex.from_tuples([tuple(_latex_text(x) for x in c) for c in tex.columns])
                   if isinstance(tex.columns, pd.MultiIndex) else [_latex_text(c) for c in tex.columns])
    if index:
        tex.index = [_latex_text(str(i)) for i in tex.index]
    styler = tex.style.format(precision=2, na_rep="–")
    if not index:
        styler = styler.hide(axis="index")
    # numbers (and "mean ± std" cells) right-aligned, text left
    numeric = ["r" if pd.api.types.is_numeric_dtype(df[c]) or isinstance(df.columns, pd.MultiIndex) else "l"
               for c in df.columns]
    latex = styler.to_latex(hrules=True, multicol_align="c", column_format=("l" if index else "") + "".join(numeric))
    (out / f"{stem}.tex").write_text((f"% data: {data}\n" if data else "") + _cmidrules(latex, df, index) + "\n")


def _cmidrules(latex: str, df: pd.DataFrame, index: bool) -> str:
    """booktabs \\cmidrule under each column group of a two-level header."""
    if not isinstance(df.columns, pd.MultiIndex):
        return latex
    lines, spans, start = latex.splitlines(), [], 1 + int(index)
    for _, group in pd.Series(df.columns.get_level_values(0)).groupby(
            (pd.Series(df.columns.get_level_values(0)) != pd.Series(df.columns.get_level_values(0)).shift()).cumsum()):
        spans.append(f"\\cmidrule(lr){{{start}-{start + len(group) - 1}}}")
        start += len(group)
    at = next(i for i, ln in enumerate(lines) if "\\multicolumn" in ln)
    return "\n".join(lines[:at + 1] + [" ".join(spans)] + lines[at + 1:])


def searched(trials: pd.DataFrame, names: list[str]) -> list[str]:
    """Of `names`, the parameters that vary among the trials of one method and label ratio; a
    value that only differs between methods (an ablation row's own rampup, say) is a method
    setting."""
    return [p for p in names if f"params.{p}" in trials and
            trials.groupby(["method", "labeled"])[f"params.{p}"].nunique().max() > 1]


def sensitivity(trials: pd.DataFrame) -> pd.DataFrame:
    """How validation Dice (points) goes with each searched setting over all trials: per value
    of a searched reading its trials' median and range; per searched number and per dose
    column its Spearman rank correlation. Empty when nothing was searched."""
    readings, numbers = searched(trials, READINGS), searched(trials, SEARCHABLE)
    if not readings and not numbers:
        return pd.DataFrame()
    from scipy import stats
    val = trials["metrics.best_val_dice"].astype(float) * 100
    rows = []
    for p in readings:
        for value, v in val.groupby(trials[f"params.{p}"]):
            rows.append({"setting": p, "value": value, "trials": len(v), "val Dice median": v.median(),
                         "val Dice min": v.min(), "val Dice max": v.max()})
    for col in [f"params.{p}" for p in numbers] + [c for c in DOSE if c in trials]:
        x = trials[col].astype(float)
        rho = stats.spearmanr(x, val, nan_policy="omit")
        rows.append({"setting": col.split(".", 1)[1].removeprefix("train_"), "value": "rank correlation",
                     "trials": int(x.notna().sum()), "Spearman ρ": rho.statistic, "p (Spearman)": rho.pvalue})
    return pd.DataFrame(rows)


def plots(trials: pd.DataFrame, out: Path) -> list[str]:
    name, _ = data_of(trials)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    numbers = searched(trials, SEARCHABLE)
    for p in numbers:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for labeled, g in trials.groupby("labeled"):
            x = g[f"params.{p}"].astype(float)
            ax.scatter(x, g["metrics.best_val_dice"], marker="o", label=f"val, labeled={labeled}")
            ax.scatter(x, g["metrics.test_dice"], marker="x", label=f"test, labeled={labeled}")
        ax.set_xlabel(p), ax.set_ylabel("Dice"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"sensitivity_{p}.png", dpi=100)
        plt.close(fig)
        made.append(f"sensitivity_{p}.png")
    if numbers:
        cols = [f"params.{p}" for p in numbers] + ["metrics.best_val_dice", "metrics.test_dice"]
        frame = trials[cols].astype(float)
        norm = (frame - frame.min()) / (frame.max() - frame.min()).replace(0, 1)
        norm.columns = [c.split(".", 1)[1] for c in cols]
        norm["labeled"] = trials["labeled"].astype(str).values
        fig, ax = plt.subplots(figsize=(7, 3.5))
        pd.plotting.parallel_coordinates(norm, "labeled", ax=ax, alpha=0.7)
        ax.set_ylabel("normalised value"), ax.set_title(f"{name}: sweep trials (min-max scaled per axis)")
        fig.tight_layout()
        fig.savefig(out / "parallel.png", dpi=100)
        plt.close(fig)
        made.append("parallel.png")
    return made


def readme(experiments: list[str], tracking_uri: str, trials: pd.DataFrame, parents: list[dict],
           files: list[str], protocol: str = "", checkpoint: str = "best") -> str:
    name, cases = data_of(trials)
    data = (f"{name} (built-in, synthetic{f', {cases} training cases' if cases else ''}; "
            "not real scans)" if trials["synthetic"].any() else f"{name} at `{trials['params.data_root'].iloc[0]}`")
    published = ("published numbers (`results/reference/published.csv`) in their own rows"
                 if protocol in PAPER_PROTOCOLS else
                 f"no published numbers beside them: these runs follow `{protocol}`, not the paper's protocol")
    lines = [f"# Tables of experiment {' + '.join(f'`{e}`' for e in experiments)}", "",
             "Generated by `buarl-tables` from the MLflow runs; do not edit by hand.", "",
             f"- data: {data}; protocol: `{protocol}`; {published}",
             f"- tracking store: `{tracking_uri}`",
             f"- test metrics of each trial's {CHECKPOINTS[checkpoint]} (`--checkpoint {checkpoint}`)",
             f"- trials counted: {len(trials)} FINISHED (one run per trial)"]
    for p in parents:
        lines.append(f"- sweep `{p.get('name')}`: `{p.get('command')}` (code {p.get('code')})")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), "",
              "Comparison: test metrics of the best-on-validation trial per (method, label ratio, "
              "seed), mean ± std over seeds; bold = best of our rows per column; rows marked "
              "(published), where shown, are numbers from `results/reference/published.csv`, not ours. "
              f"† = more than {DEGENERATE:.0%} of the present structures were predicted empty: the "
              "reference policy scores their 95HD / ASD as 0, so that mean is mostly placeholders; "
              "shown, never bolded. `empty preds` (ablation) = mean count of such misses.", "",
              "Paired (`paired.*`, `forest.png`): each row minus BCP over the seeds both ran (same seed, "
              "same pre-training where shared): mean Δ test Dice in points, its 95 % t interval (CI), "
              "paired t and Wilcoxon signed-rank p, seeds where the row won; the dose is the row's mean "
              "share of labeled pixels URL up-weights (frac_high), of unlabeled pixels below tau_u "
              "(frac_low) and of a pseudo-label CRL keeps (crl_share), at the last log step.", "",
              "Sensitivity (`sensitivity.*`, searches only): over all counted trials, validation Dice "
              "(points) per value of each searched reading (median, range), and the Spearman rank "
              "correlation of validation Dice with each searched number and each dose column.", ""]
    return "\n".join(lines)


def build(experiments: str | list[str], tracking_uri: str, out: Path, published_csv: Path = PUBLISHED,
          checkpoint: str = "best") -> list[str]:
    """Experiments run with the same protocol (e.g. a sweep and its continuation under another
    space name) can be pooled: each trial counts once, the best on validation per seed wins."""
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    runs = search(experiments, tracking_uri)
    trials = use_checkpoint(trial_runs(runs, experiments), checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    published = pd.read_csv(published_csv) if published_csv and Path(published_csv).is_file() else None
    chosen = best_per_seed(trials)
    protocol = protocol_of(trials)
    numbers, display = comparison(chosen, published, protocol)
    name, cases = data_of(chosen)
    caption = name + (" (synthetic)" if chosen["synthetic"].any() else "")
    files = []
    write_table(display, out, "comparison", index=True, csv=False, data=caption)
    numbers.to_csv(out / "comparison.csv", index=False)  # the numbers behind the display, unformatted
    files += ["comparison.md", "comparison.tex", "comparison.csv"]
    abl = ablation(chosen)
    if not abl.empty:
        abl["data"] = name
        write_table(abl, out, "ablation", index=False, data=caption)
        files += ["ablation.md", "ablation.tex", "ablation.csv"]
    pairs = paired(chosen)
    if not pairs.empty:
        pairs["data"] = name
        write_table(pairs, out, "paired", index=False, data=caption)
        files += ["paired.md", "paired.tex", "paired.csv",
                  forest(pairs, out, checkpoint, numbers["dataset"].iloc[0], (name, cases))]
    trial_list(trials, chosen).to_csv(out / "trials.csv", index=False)
    files += ["trials.csv"]
    sens = sensitivity(trials)
    if not sens.empty:
        write_table(sens, out, "sensitivity", index=False, data=caption)
        files += ["sensitivity.md", "sensitivity.tex", "sensitivity.csv"]
    files += plots(trials, out)
    sweeps = runs[runs["tags.buarl.role"] == "sweep"]
    if "tags.mlflow.parentRunId" in trials:
        # Only the sweeps behind the counted trials: an interrupted sweep whose trials were
        # finished by another (a --resume, a rerun under another name) is not part of the result.
        sweeps = sweeps[sweeps["run_id"].isin(trials["tags.mlflow.parentRunId"])]
    parents = [{"name": r.get("tags.buarl.sweep"), "command": r.get("params.command"),
                "code": r.get("tags.buarl.code_version")} for _, r in sweeps.iterrows()]
    (out / "README.md").write_text(readme(experiments, tracking_uri, trials, parents, files, protocol, checkpoint))
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="buarl-tables", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, action="append",
                   help="MLflow experiment (the space name); repeat to pool experiments of one protocol")
    p.add_argument("--tracking-uri", help="default sqlite:///$PWD/mlflow.db")
    p.add_argument("--out", help="output folder (default results/local/<experiment>, which git ignores: "
                                 "results/ beside it holds the committed real-data results)")
    p.add_argument("--published", default=str(PUBLISHED), help="published reference numbers (CSV)")
    p.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="best",
                   help="whose test metrics: the best-on-validation checkpoint (BCP's way) or the last iterate")
    args = p.parse_args(argv)
    uri = args.tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"  # as the sweep's default
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"buarl-tables: error: no tracking database at {uri}", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/local/{args.experiment[0]}")
    try:
        files = build(args.experiment, uri, out, Path(args.published), args.checkpoint)
    except BuarlError as e:
        print(f"buarl-tables: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
