"""An exported model: one folder that plain PyTorch can load (no Ray, no MLflow).

    DIR/model.pt     {"format": "buarl-model-v1", "weights": state_dict, "data": what it
                     trained on (buarl.data.origin)} (weights_only loadable)
    DIR/config.yaml  the run's fully resolved config (network, input size, protocol)
    DIR/README.md    the model card: data, protocol, label ratio, val and test metrics,
                     where it came from (command, code version, MLflow run)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from buarl.checkpoint import save_atomic
from buarl import run_folder
from buarl.config import Config, validate
from buarl.errors import BuarlError, ConfigError

FORMAT = "buarl-model-v1"
FILES = ("model.pt", "config.yaml", "README.md")


class ModelFolderError(BuarlError):
    pass


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def data_of(cfg: Config, metrics: Optional[dict]) -> dict:
    """What the model trained on: as its run recorded it (metrics.json), else from its config."""
    from buarl.data import origin
    recorded = (metrics or {}).get("data")
    return recorded if isinstance(recorded, dict) and "synthetic" in recorded else origin(cfg)


SYNTHETIC_WARNING = ("trained on buarl's synthetic phantom, not on real scans: "
                     "its labels on real scans mean nothing")


def model_card(cfg: Config, metrics: Optional[dict], origin: dict[str, Any]) -> str:
    m = metrics or {}
    data = data_of(cfg, metrics)
    size = f"{cfg.image_size}x{cfg.image_size} slices" if cfg.dataset == "acdc" else f"patch {cfg.patch_size}"
    method = {"supervised": "supervised (labeled data only)", "mt": "mean teacher", "bcp": "BCP"}[cfg.base]
    if cfg.base != "supervised" and (cfg.url or cfg.crl):
        method += " + " + " + ".join(n for n, on in (("URL", cfg.url), ("CRL", cfg.crl)) if on)
    lines = [f"# buarl model: {data['name']}, {method}", ""]
    if data["synthetic"]:
        lines += [f"> **Synthetic data.** This model was {SYNTHETIC_WARNING}. "
                  "Train on your data with `--data-root` before you use it.", ""]
    lines += ["| | |", "|---|---|",
              f"| data | {data['name']}{' (synthetic)' if data['synthetic'] else ''} at `{data['root']}` |",
              f"| label ratio | {cfg.labeled} labeled {'patients' if cfg.dataset == 'acdc' else 'scans'} |",
              f"| protocol | {size}, batch {cfg.batch_size} ({cfg.labeled_bs} labeled), "
              f"{cfg.pretrain_iters if cfg.base == 'bcp' else 0} pre-training + {cfg.iters} iterations, seed {cfg.seed} |",
              f"| method switches | base={cfg.base} url={cfg.url} crl={cfg.crl} tau_l={cfg.tau_l} tau_u={cfg.tau_u} "
              f"lambda_url={cfg.lambda_url} lambda_crl={cfg.lambda_crl} ema_decay={cfg.ema_decay} |",
              f"| model selection | best validation Dice {_fmt(m.get('best_val_dice', 'n/a'))} "
              f"at iteration {m.get('best_step', 'n/a')} |",
              f"| test (not used for selection) | Dice {_fmt(m.get('dice', 'n/a'))}, Jaccard {_fmt(m.get('jaccard', 'n/a'))}, "
              f"95HD {_fmt(m.get('hd95', 'n/a'), 2)}, ASD {_fmt(m.get('asd', 'n/a'), 2)}, empty predictions "
              f"{m.get('empty_predictions', 'n/a')} of {m.get('structures', 'n/a')} structures |"]
    lines += [f"| {k} | {v} |" for k, v in origin.items() if v not in (None, "")]
    lines += ["", "Segment new scans:", "", "```", "buarl predict --model THIS_FOLDER --input scan.nii.gz --out predictions/",
              "```", "", "Load with plain PyTorch:", "", "```",
              "from buarl.model_folder import load_model",
              "model, cfg = load_model('THIS_FOLDER')", "```", ""]
    return "\n".join(lines)


def write_model(out: Path, weights: dict, cfg: Config, metrics: Optional[dict], origin: dict[str, Any],
                overwrite: bool = False) -> Path:
    out = Path(out)
    taken = [f for f in FILES if (out / f).exists()]
    if taken and not overwrite:
        raise ConfigError(f"--out {out}: already holds {', '.join(taken)}; pass --overwrite or choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    save_atomic({"format": FORMAT, "weights": weights, "data": data_of(cfg, metrics)}, out / "model.pt")
    run_folder.write_config(out, cfg)
    (out / "README.md").write_text(model_card(cfg, metrics, origin))
    if metrics:
        run_folder.write_metrics(out, metrics)
    return out


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """The network in eval mode on `device` and its config; a wrong folder is one clear error."""
    from buarl.nets import build
    from buarl.engine import to_device

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"--model {folder}: no such folder")
    missing = [f for f in ("model.pt", "config.yaml") if not (folder / f).is_file()]
    if missing:
        hint = " (a `buarl train` run folder? export it first: buarl export --run RUN --out DIR)" \
            if (folder / "best.pt").exists() else ""
        raise ModelFolderError(f"--model {folder}: not a buarl model folder, {' and '.join(missing)} missing{hint}")
    try:
        cfg = validate(yaml.safe_load((folder / "config.yaml").read_text()) or {}, source=f"{folder / 'config.yaml'}", stored=True)
    except yaml.YAMLError as e:
        raise ModelFolderError(f"{folder / 'config.yaml'}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ConfigError as e:
        raise ModelFolderError(str(e)) from None
    try:
        obj = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFolderError(f"{folder / 'model.pt'}: not readable ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelFolderError(f"{folder / 'model.pt'}: not a buarl model (expected format {FORMAT!r})")
    model = build(cfg.dataset, cfg.num_classes, cfg.in_channels)
    try:
        model.load_state_dict(obj["weights"])
    except RuntimeError as e:
        raise ModelFolderError(f"{folder / 'model.pt'}: weights do not fit the {cfg.dataset} network "
                               f"({str(e).splitlines()[0][:160]})") from None
    device = torch.device(device)
    data = obj["data"] if isinstance(obj.get("data"), dict) else data_of(cfg, None)  # (older folders)
    if data.get("synthetic"):
        print(f"buarl: warning: model {folder} was {SYNTHETIC_WARNING}", file=sys.stderr)
    cfg = cfg.model_copy(update={"device": str(device)})
    model = to_device(model, cfg, device, 2 if cfg.dataset == "acdc" else 3).eval()
    return model, cfg
