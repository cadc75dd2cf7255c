"""`buarl phantom | train | evaluate`: one run without Ray.

User errors (config, data, checkpoint) print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from buarl.config import SHIPPED, load_config, parse_overrides
from buarl.errors import BuarlError, ConfigError, TrainingDiverged


def _phantom(args) -> int:
    from buarl.data import phantom
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: folder exists and is not empty; choose a new folder")
    phantom.make(args.kind, out, cases=args.cases, seed=args.seed)
    print(f"wrote a {args.kind.upper()}-layout phantom ({args.cases} training cases, seed {args.seed}) to {out}")
    return 0


def resolve(config: str, sets: list[str], data_root: str | None):
    """The validated config of a run, with the data root made explicit and absolute."""
    from buarl.data import resolve_root
    overrides = parse_overrides(sets)
    if data_root is not None:
        overrides["data_root"] = data_root
    cfg = load_config(config, overrides)
    if cfg.data_root is None:
        root = resolve_root(cfg)
        print(f"no data root given: using the built-in {cfg.dataset.upper()} phantom at {root}\n"
              f"  (point at real data with --data-root, e.g. --data-root ../shared/data/"
              f"{'ACDC' if cfg.dataset == 'acdc' else 'LA'})", file=sys.stderr)
    else:
        root = Path(cfg.data_root).expanduser()
    return cfg.model_copy(update={"data_root": str(root.resolve())})


def _train(args) -> int:
    from buarl.provenance import environment
    from buarl.reporting import LocalReporter
    from buarl.train import train

    cfg = resolve(args.config, args.set, args.data_root)
    name = Path(args.config).stem if args.config not in SHIPPED else args.config
    out = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for existing in ("best.pt", "metrics.json"):
        if (out / existing).exists():
            raise ConfigError(f"--out {out}: already holds a finished run ({existing}); "
                              "choose a new folder so nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    run = {"command": " ".join(shlex.quote(a) for a in sys.argv), "seed": cfg.seed,
           "data_root": cfg.data_root, **environment()}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"run folder {out} (config.yaml, run.json, train.log, best.pt, metrics.json)")
    started = time.time()
    metrics = train(cfg, LocalReporter(cfg, out))
    summary = {k: metrics[k] for k in ("dice", "jaccard", "hd95", "asd", "empty_predictions",
                                       "best_val_dice", "best_step")}
    print(json.dumps({"wall_seconds": round(time.time() - started, 1), **summary}, indent=2))
    return 0


def _evaluate(args) -> int:
    from buarl.checkpoint import config_of, load_into, read
    from buarl.data import load_benchmark
    from buarl.evaluate import evaluate
    from buarl.nets import build
    from buarl.runtime import device_of, to_device

    ckpt = Path(args.checkpoint)
    obj = read(ckpt)
    cfg = config_of(obj, ckpt)
    if args.data_root:
        cfg = cfg.model_copy(update={"data_root": str(Path(args.data_root).resolve())})
    device = device_of(cfg)
    model = build(cfg.dataset, cfg.num_classes)
    load_into(model, obj["weights"], ckpt)
    model = to_device(model, cfg, device, 2 if cfg.dataset == "acdc" else 3)
    data = load_benchmark(cfg)
    cases = data.val if args.split == "val" else data.test
    metrics = evaluate(model, cases, cfg, device, policy=args.empty_policy)
    out = ckpt.with_name(f"evaluate_{args.split}_{metrics['empty_policy']}.json")
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="buarl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    ph = sub.add_parser("phantom", help="write a synthetic dataset in the reference layout")
    ph.add_argument("--kind", choices=["acdc", "la"], required=True)
    ph.add_argument("--out", required=True)
    ph.add_argument("--cases", type=_positive, default=8, help="training patients (ACDC) or scans (LA)")
    ph.add_argument("--seed", type=int, default=0)
    ph.set_defaults(fn=_phantom)

    tr = sub.add_parser("train", help="one training run (no Ray)")
    tr.add_argument("--config", default="phantom", help=f"shipped name ({', '.join(SHIPPED)}) or YAML path")
    tr.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. --set iters=100 tau_l=0.7")
    tr.add_argument("--data-root", help="dataset folder (default: the config's, else a phantom)")
    tr.add_argument("--out", help="run folder (default runs/<config>-<time>)")
    tr.set_defaults(fn=_train)

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on val or test")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data-root", help="dataset folder (default: the one the checkpoint was trained on)")
    ev.add_argument("--split", choices=["val", "test"], default="test")
    ev.add_argument("--empty-policy", choices=["reference", "strict"], default=None,
                    help="scoring of a missed class (default: the checkpoint config's)")
    ev.set_defaults(fn=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except TrainingDiverged as e:
        print(f"buarl: training diverged: {e}", file=sys.stderr)
        return 3
    except BuarlError as e:
        print(f"buarl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
