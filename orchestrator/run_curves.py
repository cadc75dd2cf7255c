"""Compare `buarl train` folders without MLflow: val Dice curves and test metrics.

    python -m orchestrator.run_curves NAME=RUN_DIR ... --out DIR [--title TEXT]

Reads each folder's train.log (the `val_dice=` lines) and metrics.json, writes
DIR/curves.csv (one row per evaluation), DIR/summary.md (one row per run) and
DIR/val_curves.png. A missing or unfinished folder is named and refused before anything
is written; with --partial an unfinished run (train.log, no metrics.json: stopped before
its end) is drawn and listed with its last iteration and no test metrics.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

def fail(message: str):
    print(f"run_curves: {message}", file=sys.stderr)
    raise SystemExit(2)


VAL = re.compile(r"it\s+(\d+) val_dice=([0-9.]+)(?: val_fg=([0-9.]+))?")


def read_run(name: str, folder: Path, partial: bool = False) -> tuple[pd.DataFrame, dict | None]:
    log, metrics = folder / "train.log", folder / "metrics.json"
    for f in (log, metrics):
        if not f.is_file() and not (partial and f == metrics and log.is_file()):
            fail(f"{name}: {f} not found (is the run finished?{'' if partial else ' --partial draws unfinished runs'})")
    rows = [{"run": name, "iteration": int(m[1]), "val_dice": float(m[2]),
             "val_fg": float(m[3]) if m[3] else float("nan")} for m in VAL.finditer(log.read_text())]
    if not rows:
        fail(f"{name}: no val_dice lines in {log}")
    return pd.DataFrame(rows), json.loads(metrics.read_text()) if metrics.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--title", default="val Dice")
    p.add_argument("--pretrain-iters", type=int, default=0, help="draw a line where self-training starts")
    p.add_argument("--partial", action="store_true", help="also draw runs stopped before their end (no test metrics)")
    a = p.parse_args(argv)
    curves, summary = [], []
    for spec in a.runs:
        name, sep, folder = spec.partition("=")
        if not sep:
            fail(f"{spec!r}: expected NAME=RUN_DIR")
        df, m = read_run(name, Path(folder), a.partial)
        curves.append(df)
        row = {"run": name, "val Dice (each evaluation)": " ".join(f"{v:.2f}" for v in df.val_dice)}
        if m is None:  # unfinished: the best so far, no test
            best = df.loc[df.val_dice.idxmax()]
            row.update({"best val": round(float(best.val_dice), 4), "best at": int(best.iteration),
                        "test Dice %": f"stopped at {int(df.iteration.max())}", "Jaccard %": "—", "95HD": "—",
                        "ASD": "—", "empty": "—"})
        else:
            row.update({"best val": round(m["best_val_dice"], 4), "best at": m["best_step"],
                        "test Dice %": round(100 * m["dice"], 2), "Jaccard %": round(100 * m["jaccard"], 2),
                        "95HD": round(m["hd95"], 2), "ASD": round(m["asd"], 2),
                        "empty": f"{m['empty_predictions']} / {m['structures']}"})
        summary.append(row)
    a.out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(curves)
    table.to_csv(a.out / "curves.csv", index=False)
    (a.out / "summary.md").write_text(pd.DataFrame(summary).to_markdown(index=False) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, g in table.groupby("run", sort=False):
        ax.plot(g.iteration, g.val_dice, marker="o", ms=3, label=name)
    if a.pretrain_iters:
        ax.axvline(a.pretrain_iters, color="grey", ls=":", lw=1)
    ax.set(xlabel="iteration", ylabel="mean val Dice", title=a.title, ylim=(0, 1))
    ax.legend(title="settings", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out / "val_curves.png", dpi=120)
    print(f"wrote {a.out}/curves.csv, summary.md, val_curves.png ({len(summary)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
