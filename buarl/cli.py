"""`buarl phantom | prepare | train | evaluate | export | predict`: one run without Ray, and its use.

User errors (config, data, checkpoint) print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

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


def _prepare(args) -> int:
    from buarl.prepare import prepare
    prepare(Path(args.source), Path(args.out), val=args.val, test=args.test, labeled=args.labeled, dim=args.dim,
            mr_norm=args.mr_norm, seed=args.seed, labels=args.labels, channels=args.channels)
    return 0


def resolve(config: str, sets: list[str], data_root: str | None):
    """The validated config of a run, with the data root made explicit and absolute."""
    from buarl.data import resolve_root
    from buarl.prepare import settings
    overrides = parse_overrides(sets)
    if data_root is not None:
        overrides["data_root"] = data_root
    # a prepared root (`buarl prepare`) decides its kind, classes and split; --set still wins
    given = overrides.get("data_root")
    overrides = {**(settings(Path(given).expanduser()) if given else {}), **overrides}
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

    from buarl import pretraining
    cfg = resolve(args.config, args.set, args.data_root)
    if args.pretrain_only and args.from_pretrained:
        raise ConfigError("--pretrain-only and --from-pretrained exclude each other")
    start, env = None, environment()
    if args.from_pretrained:  # checked before anything is written
        obj = pretraining.read(Path(args.from_pretrained))
        start = pretraining.start_state(cfg, obj, f"--from-pretrained {args.from_pretrained}")
        digest = env["buarl_digest"]
        if obj.get("digest") != digest:
            print(f"buarl: warning: --from-pretrained {args.from_pretrained} was made by other buarl code "
                  f"({obj.get('digest')}, this is {digest}); its hand-over may differ from this code's",
                  file=sys.stderr)
    elif args.pretrain_only and not pretraining.forks(cfg):
        raise ConfigError(f"--pretrain-only: base={cfg.base}, pretrain_iters={cfg.pretrain_iters} has no "
                          "pre-training stage (base=bcp with pretrain_iters > 0 has)")
    name = Path(args.config).stem if args.config not in SHIPPED else args.config
    out = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from buarl import run_folder
    for existing in (run_folder.BEST, run_folder.METRICS, pretraining.FILE):
        if (out / existing).exists():
            raise ConfigError(f"--out {out}: already holds a finished run ({existing}); "
                              "choose a new folder so nothing is overwritten")
    from buarl.data import load_benchmark
    data = load_benchmark(cfg)  # its checks before anything is written: a refused run leaves no folder
    out.mkdir(parents=True, exist_ok=True)
    run_folder.write_config(out, cfg)
    run_folder.write_run_info(out, {"command": " ".join(shlex.quote(a) for a in sys.argv), "seed": cfg.seed,
                                    "data_root": cfg.data_root, "from_pretrained": args.from_pretrained,
                                    **env})
    started = time.time()
    if args.pretrain_only:
        print(f"run folder {out} (config.yaml, run.json, train.log, {pretraining.FILE})")
        reporter = LocalReporter(cfg, out, total=cfg.pretrain_iters)
        try:
            state = pretraining.pretrain(cfg, data=data, reporter=reporter)
        finally:
            reporter.close()
        pretraining.save(out / pretraining.FILE, cfg, state, env["buarl_digest"])
        best = state.get("pre_best") or {}
        print(json.dumps({"wall_seconds": round(time.time() - started, 1), "pretrained": str(out / pretraining.FILE),
                          "best_pretrain_val_dice": best.get("dice"), "best_pretrain_step": best.get("step")},
                         indent=2))
        return 0
    print(f"run folder {out} (config.yaml, run.json, train.log, best.pt, metrics.json)")
    try:
        metrics = train(cfg, LocalReporter(cfg, out), data=data, start=start)
    except BaseException as e:  # the run folder says why it ended, not only the terminal
        with (out / run_folder.LOG).open("a") as log:
            log.write(f"ERROR: run ended with {type(e).__name__}: {e}\n")
        raise
    summary = {k: metrics[k] for k in ("dice", "jaccard", "hd95", "asd", "empty_predictions",
                                       "best_val_dice", "best_step")}
    summary["last_iterate_dice"] = metrics["last"]["dice"]
    print(json.dumps({"wall_seconds": round(time.time() - started, 1), **summary}, indent=2))
    return 0


def _evaluate(args) -> int:
    from buarl.checkpoint import config_of, load_into, read
    from buarl.data import load_benchmark
    from buarl.evaluate import evaluate
    from buarl.nets import build
    from buarl.engine import device_of, to_device

    ckpt = Path(args.checkpoint)
    obj = read(ckpt)
    cfg = config_of(obj, ckpt)
    if args.data_root:
        cfg = cfg.model_copy(update={"data_root": str(Path(args.data_root).resolve())})
    device = device_of(cfg)
    model = build(cfg.dataset, cfg.num_classes, cfg.in_channels)
    load_into(model, obj["weights"], ckpt)
    model = to_device(model, cfg, device, 2 if cfg.dataset == "acdc" else 3)
    data = load_benchmark(cfg)
    cases = data.val if args.split == "val" else data.test
    metrics = evaluate(model, cases, cfg, device, policy=args.empty_policy)
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{ckpt} on {args.split} ({metrics['cases']} cases, empty policy {metrics['empty_policy']}):")
    print(f"  Dice {100 * metrics['dice']:.2f} %  Jaccard {100 * metrics['jaccard']:.2f} %  "
          f"95HD {metrics['hd95']:.2f}  ASD {metrics['asd']:.2f}  "
          f"empty predictions {metrics['empty_predictions']} of {metrics['structures']}")
    for name, m in metrics["per_class"].items():
        print(f"  {name:>4}: Dice {100 * m['dice']:.2f} %  95HD {m['hd95']:.2f}  ASD {m['asd']:.2f}")
    if args.out:
        print(f"  all metrics (per case too): {args.out}")
    return 0


def _export(args) -> int:
    from buarl.model_folder import write_model

    if args.run:
        from buarl.checkpoint import config_of, read
        run = Path(args.run)
        if not (run / "best.pt").is_file():
            raise ConfigError(f"--run {run}: no best.pt (expected a finished `buarl train` folder)")
        obj = read(run / "best.pt")
        cfg = config_of(obj, run / "best.pt")
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
        origin = {"source": f"`buarl train` folder `{run.resolve()}`", "command": f"`{info.get('command', '')}`",
                  "code version": info.get("code_version"), "code digest": info.get("buarl_digest")}
        out = write_model(Path(args.out), obj["weights"], cfg, metrics, origin, overwrite=args.overwrite)
    else:
        # MLflow lives with the orchestrator, which hands its exporter in (orchestrator/cli.py)
        export_best = getattr(args, "export_experiment", None)
        if export_best is None:
            raise ConfigError("export --experiment reads MLflow: run it through the `buarl` command "
                              "(orchestrator.cli), which the orchestrator install provides")
        out = export_best(args.experiment, args.grid_point, args.tracking_uri, Path(args.out), args.overwrite)
    print(f"exported a model folder to {out} (model.pt, config.yaml, README.md)")
    return 0


def _predict(args) -> int:
    import torch
    from tqdm import tqdm

    from buarl.inference import predict_volume
    from buarl.model_folder import load_model
    from buarl.volume_io import SUFFIXES, InputError, group_inputs, outputs_for, read_scan, write_prediction

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    model, cfg = load_model(Path(args.model), args.device)
    inputs: list[Path] = []
    for given in map(Path, args.input):
        if given.is_dir():
            inputs += sorted(p for p in given.iterdir() if p.name.lower().endswith(SUFFIXES))
        else:
            inputs.append(given)
    if not inputs:
        raise ConfigError(f"--input {' '.join(args.input)}: no scans found ({', '.join(SUFFIXES)})")
    out = Path(args.out)
    try:
        scans = group_inputs(inputs, cfg.in_channels)
    except InputError as e:
        raise ConfigError(str(e)) from None
    planned: dict[Path, Path] = {}
    for scan in scans:
        for target in outputs_for(scan, out, args.uncertainty):
            if target in planned:
                raise ConfigError(f"--input: {scan.path} and {planned[target]} would both write {target}")
            planned[target] = scan.path
    existing = [t for t in planned if t.exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"--out {out}: {existing[0]} exists ({len(existing)} of the outputs do); "
                          "pass --overwrite or choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    bar = tqdm(scans, unit="scan", disable=None, file=sys.stderr)
    for files in bar:
        bar.set_postfix_str(files.name)
        try:
            scan = read_scan(files, cfg)
        except InputError as e:
            skipped.append(files.path)
            tqdm.write(f"buarl: skipped {e}", file=sys.stderr)
            continue
        result = predict_volume(model, scan.image, cfg, torch.device(args.device), uncertainty=args.uncertainty)
        labels, entropy = result if args.uncertainty else (result, None)
        write_prediction(scan, labels, entropy, out, cfg.dataset)
        written += 1
    print(f"segmented {written} of {len(scans)} scan(s) into {out}"
          + (f"; skipped {len(skipped)}: {', '.join(str(p) for p in skipped)}" if skipped else ""))
    return 2 if skipped else 0


def pretraining_file() -> str:
    from buarl.pretraining import FILE
    return FILE


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

    pp = sub.add_parser("prepare", help="your own NIfTI dataset (nnU-Net v2 raw, Decathlon, or images/ + labels/) "
                                        "as a data root",
                        description="Read an nnU-Net v2 raw dataset (dataset.json, imagesTr/CASE_0000.nii.gz, "
                                    "labelsTr/CASE.nii.gz), a Medical Segmentation Decathlon one (dataset.json "
                                    "'training' list) or a plain folder pair (images/CASE.nii.gz, labels/CASE.nii.gz, "
                                    "classes named by --labels) and write a data root that train, evaluate, sweep and "
                                    "predict take as --data-root. A case in imagesTr (images/) without a label file is "
                                    "an unlabeled case: semi-supervised bases train on it, its label is never needed. "
                                    "Every file is read and checked before anything is written.")
    pp.add_argument("source", help="the dataset folder (holding dataset.json, or images/ and labels/)")
    pp.add_argument("--labels", nargs="+", metavar="NAME=VALUE",
                    help="images/ + labels/ only: the classes, background included (e.g. background=0 lesion=1)")
    pp.add_argument("--channels", nargs="+", metavar="NAME",
                    help="images/ + labels/ only: the channels' names (default: MRI; CT gets CT normalisation); "
                         "several: images named CASE_0000, CASE_0001, ...")
    pp.add_argument("--out", required=True, help="the data root to write (a new or empty folder)")
    pp.add_argument("--val", type=_positive, default=1, help="labeled cases held out for validation (default 1)")
    pp.add_argument("--test", type=_positive, default=1, help="labeled cases held out for testing (default 1)")
    pp.add_argument("--labeled", type=_positive,
                    help="labeled training cases to keep labeled; the others train as unlabeled (default: all)")
    pp.add_argument("--dim", type=int, choices=[2, 3],
                    help="2: slices (a 2-D UNet), 3: volumes (a 3-D VNet); default: 2 when the spacing is "
                         "strongly anisotropic (coarsest >= 3x finest, as nnU-Net), else 3")
    pp.add_argument("--mr-norm", choices=["minmax", "zscore"], default="minmax",
                    help="per-volume normalisation of non-CT channels (minmax: to [0, 1], as the ACDC files); "
                         "CT channels: clip to the foreground's 0.5-99.5 percentiles, then z-score")
    pp.add_argument("--seed", type=int, default=0, help="seed of the val/test/labeled split")
    pp.set_defaults(fn=_prepare)

    tr = sub.add_parser("train", help="one training run (no Ray)")
    tr.add_argument("--config", default="phantom", help=f"shipped name ({', '.join(SHIPPED)}) or YAML path")
    tr.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. --set iters=100 tau_l=0.7")
    tr.add_argument("--data-root", help="dataset folder (default: the config's, else a phantom)")
    tr.add_argument("--out", help="run folder (default runs/<config>-<time>)")
    tr.add_argument("--pretrain-only", action="store_true",
                    help=f"run BCP's pre-training stage only and write {pretraining_file()} (the hand-over "
                         "to self-training) into the run folder")
    tr.add_argument("--from-pretrained", metavar="RUN",
                    help=f"start self-training from a pre-training: a --pretrain-only run folder, its "
                         f"{pretraining_file()}, or a sweep's <storage>/pretrain/<hash>/; refused unless its "
                         "pre-training settings are this run's")
    tr.set_defaults(fn=_train)

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on val or test")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data-root", help="dataset folder (default: the one the checkpoint was trained on)")
    ev.add_argument("--split", choices=["val", "test"], default="test")
    ev.add_argument("--empty-policy", choices=["reference", "strict"], default=None,
                    help="scoring of a missed class (default: the checkpoint config's)")
    ev.add_argument("--out", help="also write every metric (per class, per case) to this JSON file")
    ev.add_argument("--json", action="store_true", help="print the full metrics as JSON instead of a summary")
    ev.set_defaults(fn=_evaluate)

    ex = sub.add_parser("export", help="a model folder (weights, config, model card) from a run or a sweep's best trial")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished `buarl train` folder")
    src.add_argument("--experiment", help="an MLflow experiment (a sweep's space name): its best FINISHED trial by "
                                          "validation, never by test")
    ex.add_argument("--grid-point", default="*", metavar="GLOB", help="only trials of matching grid points (--experiment)")
    ex.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///$PWD/mlflow.db)")
    ex.add_argument("--out", required=True, help="the model folder to write")
    ex.add_argument("--overwrite", action="store_true", help="replace the files of an existing model folder")
    ex.set_defaults(fn=_export)

    pr = sub.add_parser("predict", help="segment new scans (NIfTI, benchmark h5, .npy) with an exported model")
    pr.add_argument("--model", required=True, help="a model folder from `buarl export`")
    pr.add_argument("--input", required=True, nargs="+",
                    help="scan files or folders of them (.nii.gz, .nii, .h5, .npy); a model of several channels "
                         "takes nnU-Net's CASE_0000, CASE_0001, ... files (grouped per case, written as "
                         "CASE.nii.gz) or one 4-D NIfTI with the channels last")
    pr.add_argument("--out", required=True, help="folder for the label maps (same format, shape, affine as each input)")
    pr.add_argument("--uncertainty", action="store_true", help="also write the normalised entropy map of each scan")
    pr.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    pr.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    pr.set_defaults(fn=_predict)
    return p


def main(argv: list[str] | None = None, **defaults) -> int:
    """`defaults`: what another layer adds to every command (the orchestrator's exporter)."""
    p = parser()
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
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
