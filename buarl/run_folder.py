"""The files of a run, named and written in one place. `buarl train` writes them into its
folder; a Ray trial writes the same files into its final checkpoint, from where the sweep
hands them to MLflow as artifacts; `buarl export` and the tables read them by these names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from buarl.checkpoint import save_best
from buarl.config import Config

BEST = "best.pt"          # the best-on-validation weights (buarl.checkpoint format)
CONFIG = "config.yaml"    # the fully resolved config
METRICS = "metrics.json"  # the test metrics of the best weights (buarl.evaluate schema)
REGIONS = "regions.png"   # URL / CRL regions on a few validation slices
RUN = "run.json"          # command, seed, data root and code version of a `buarl train` run
LOG = "train.log"
ARTIFACTS = (CONFIG, METRICS, BEST, REGIONS)  # what a finished trial leaves in MLflow


def write_config(folder: Path, cfg: Config) -> None:
    (Path(folder) / CONFIG).write_text(yaml.safe_dump(cfg.sectioned(), sort_keys=False))


def write_metrics(folder: Path, metrics: dict) -> None:
    (Path(folder) / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def write_run_info(folder: Path, info: dict[str, Any]) -> None:
    (Path(folder) / RUN).write_text(json.dumps(info, indent=2) + "\n")


def write_best(folder: Path, weights: dict, cfg: Config, step: int, val_dice: float) -> None:
    save_best(Path(folder) / BEST, weights, cfg, step, val_dice)


def write_regions(folder: Path, cfg: Config, weights: dict, cases: list) -> None:
    import torch

    from buarl.nets import build
    from buarl.visualize import region_grid
    model = build(cfg.dataset, cfg.num_classes, cfg.in_channels)
    model.load_state_dict(weights)
    region_grid(model, cases, cfg, torch.device("cpu"), Path(folder) / REGIONS)


def write_final(folder: Path, cfg: Config, metrics: dict, best_weights: dict,
                preview_cases: Optional[list] = None) -> None:
    """What a finished run leaves: best weights, config, test metrics (and the regions
    figure when preview cases are given)."""
    write_best(folder, best_weights, cfg, metrics["best_step"], metrics["best_val_dice"])
    write_config(folder, cfg)
    write_metrics(folder, metrics)
    if preview_cases:
        write_regions(folder, cfg, best_weights, preview_cases)
