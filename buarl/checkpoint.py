"""Checkpoint files: written atomically, read with weights_only=True, errors named."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from buarl.config import Config, validate
from buarl.errors import CheckpointError

FORMAT = "buarl-checkpoint-v1"


def save_atomic(obj: dict, path: Path) -> None:
    """Write next to the target and rename, so a crash never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_best(path: Path, weights: dict, cfg: Config, step: int, val_dice: float) -> None:
    save_atomic({"format": FORMAT, "config": cfg.to_dict(), "weights": weights,
                 "step": step, "val_dice": val_dice}, path)


def read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a buarl checkpoint (expected format {FORMAT!r})")
    return obj


def load_into(model: nn.Module, weights: dict, path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the {type(model).__name__} "
                              f"architecture ({first[:160]})") from None


def config_of(obj: dict, path: Path) -> Config:
    from buarl.errors import ConfigError
    try:
        return validate(obj["config"], source=f"checkpoint {path}", stored=True)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
