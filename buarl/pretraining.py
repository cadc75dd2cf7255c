"""Shared pre-training: BCP's labeled-only stage, run once and handed to many self-trainings.

Pre-training depends on none of BUARL's settings (URL, CRL, thresholds, EMA decay, loss
weights): every trial of a search over them that shares the settings below would pre-train
the same model. `pretrain` runs the loop to the end of pre-training and returns the loop's
whole state at the hand-over (student, teacher, optimizer, sampler, generators, the best
pre-training checkpoint), which is what the loop itself holds at that iteration; a loop
started from it (`train(cfg, start=state)`) continues exactly as if it had pre-trained
itself (tests/test_pretraining.py: equal on the CPU).

A pre-training file is a dict: `format`, `key` (the settings below, as resolved), `digest`
(of the buarl sources that ran it) and `state`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from buarl.config import Config
from buarl.errors import CheckpointError, ConfigError

FORMAT = "buarl-pretrained-v1"
FILE = "pretrained.pt"  # in a --pretrain-only run folder and a sweep's <storage>/pretrain/<hash>/

# Every setting the pre-training stage reads: data and split, the network and its
# arithmetic, the sampler, the optimizer and its schedule, the copy-paste loss, and when it
# validates (which checkpoint is best). Threads are left out so that sweeps run at other
# thread counts share it: on the CPU they change the order of float sums, so a fork from a
# pre-training made at another count is the same run statistically, not bit for bit.
KEYS = ("dataset", "data_root", "labeled", "val_cases", "image_size", "patch_size", "batch_size", "labeled_bs",
        "lr", "lr_schedule", "momentum", "weight_decay", "pretrain_iters", "eval_every", "paste_ratio",
        "pretrain_loss", "dice_smooth", "dice_form", "la_stride_xy", "la_stride_z",
        "seed", "precision", "device", "compile")


class PretrainMismatch(ConfigError):
    """A pre-training handed to a run whose own pre-training would differ."""


def forks(cfg: Config) -> bool:
    """Whether the config has a pre-training stage to share (BCP's)."""
    return cfg.base == "bcp" and cfg.pretrain_iters > 0


def key_of(cfg: Config) -> dict[str, Any]:
    """The settings a run's pre-training depends on, as resolved (JSON values)."""
    values = cfg.to_dict()
    return {k: values[k] for k in KEYS}


def differences(cfg: Config, key: dict[str, Any]) -> list[str]:
    """`name: pre-trained X, this run Y` for every setting where `key` differs from cfg's."""
    mine = key_of(cfg)
    return [f"{k}: pre-trained with {key.get(k)!r}, this run {mine[k]!r}"
            for k in KEYS if key.get(k) != mine[k]]


def pretrain(cfg: Config, data=None, reporter=None) -> dict:
    """Run the pre-training stage of `cfg` and return the loop's state at the hand-over."""
    from buarl.train import Loop, Reporter
    if not forks(cfg):
        raise ConfigError(f"base={cfg.base}, pretrain_iters={cfg.pretrain_iters}: no pre-training stage to run "
                          "(only base=bcp pre-trains)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Loop(cfg, reporter or Reporter(), lambda m: m, data).run_pretraining()


def package(cfg: Config, state: dict, digest: str) -> dict:
    return {"format": FORMAT, "key": key_of(cfg), "digest": digest, "state": state}


def save(path: Path, cfg: Config, state: dict, digest: str) -> None:
    from buarl.checkpoint import save_atomic
    save_atomic(package(cfg, state, digest), Path(path))


def read(path: Path) -> dict:
    """A pre-training file, checked for its format; errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no pre-training file (expected {FILE} of `buarl train --pretrain-only`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises whatever the unpickler meets
        raise CheckpointError(f"{path}: not a readable pre-training file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "state" not in obj:
        raise CheckpointError(f"{path}: not a buarl pre-training file (expected format {FORMAT!r})")
    return obj


def state_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The entries of two hand-over states (nested dicts of tensors and numbers) that are not
    bit-identical, by path (`student.conv.weight`, `optimizer.state.3.momentum_buffer`);
    [] when one run forked from either would continue exactly alike."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        name, x, y = f"{prefix}{k}", a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += state_differences(x, y, f"{name}.")
        elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                out.append(name)
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            out += state_differences(dict(enumerate(x)), dict(enumerate(y)), f"{name}.")
        elif type(x) is not type(y) or x != y:
            out.append(name)
    return out


def start_state(cfg: Config, obj: dict, source: str, digest: Optional[str] = None) -> dict:
    """The state a run of `cfg` starts from, after checking that `obj` is the pre-training this
    run would have made: the same settings (else PretrainMismatch naming each difference) and
    the pre-training's iteration count. A different code digest is the caller's to judge."""
    if not forks(cfg):
        raise PretrainMismatch(f"{source}: base={cfg.base} has no pre-training stage to start from")
    diff = differences(cfg, obj["key"])
    if diff:
        raise PretrainMismatch(f"{source}: made with other pre-training settings: " + "; ".join(diff))
    state = obj["state"]
    if int(state["step"]) != cfg.pretrain_iters:
        raise PretrainMismatch(f"{source}: holds iteration {state['step']}, not the end of pre-training "
                               f"({cfg.pretrain_iters})")
    return state

