"""`python -m orchestrator.promote`: a search's winner as a row of a paired evaluation.

Reads the FINISHED trials of a search experiment from MLflow, takes the best by validation
(never by test), and writes a space: the evaluation space's grid (labels, seeds) with one
switch, the winner's searched values under a row name. Run with the evaluation's --storage,
its trials fork from the evaluation's shared pre-trainings (same seeds, same settings).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buarl.errors import BuarlError  # noqa: E402
from orchestrator.names import VAL_METRICS  # noqa: E402


def winner(experiment: str, tracking_uri: str, metric: str = "best_val_dice") -> tuple[dict, dict]:
    """(the best trial's searched values, facts about it) by `metric`, a validation metric."""
    from orchestrator.space import load_space
    from orchestrator.tables import search, trial_runs
    if metric not in VAL_METRICS:
        raise BuarlError(f"--metric {metric}: a winner is chosen on validation ({', '.join(VAL_METRICS)})")
    trials = trial_runs(search([experiment], tracking_uri), [experiment])
    best = trials.sort_values(f"metrics.{metric}", ascending=False).iloc[0]
    space, _ = load_space(experiment)
    values = {}
    for key in space.search:
        raw = best.get(f"params.{key}")
        values[key] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    facts = {"run_id": best["run_id"], metric: float(best[f"metrics.{metric}"]), "trials": len(trials),
             "seed": int(best["seed"])}
    return values, facts


def promoted_space(evaluation: str, row: str, values: dict, fixed: dict, facts: dict, experiment: str) -> str:
    from orchestrator.space import _locate
    path = _locate(evaluation)
    space = yaml.safe_load(path.read_text())
    space["description"] = f"{row}: the winner of search {experiment!r}, on {path.name}'s grid"
    space["grid"]["switches"] = [{"row": row, **fixed, **values}]
    header = (f"# Written by `python -m orchestrator.promote` from search {experiment!r}: its best of "
              f"{facts['trials']} FINISHED trials by validation\n# (run {facts['run_id']}, seed {facts['seed']}, "
              f"{'best_val_dice'} {facts.get('best_val_dice', float('nan')):.4f}), on the grid of {path.name}.\n")
    return header + yaml.safe_dump(space, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="promote", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="the search's MLflow experiment (its space name)")
    p.add_argument("--evaluation", required=True, help="the space whose grid (labels, seeds) the row joins")
    p.add_argument("--row", required=True, help="the row's name in the tables")
    p.add_argument("--tracking-uri", help="default sqlite:///$PWD/mlflow.db")
    p.add_argument("--out", required=True, help="the space file to write")
    args = p.parse_args(argv)
    uri = args.tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    out = Path(args.out)
    if out.exists():
        print(f"promote: error: {out} exists; remove it to promote again", file=sys.stderr)
        return 2
    try:
        from orchestrator.space import load_space
        values, facts = winner(args.experiment, uri)
        search_space, _ = load_space(args.experiment)
        text = promoted_space(args.evaluation, args.row, values, search_space.fixed, facts, args.experiment)
    except BuarlError as e:
        print(f"promote: error: {e}", file=sys.stderr)
        return 2
    out.write_text(text)
    load_space(str(out))  # what was written is a valid space
    print(f"wrote {out}: row {args.row!r} = {values} (run {facts['run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
