"""Datasets in the reference layouts, and the phantom used when no data root is given."""
from __future__ import annotations

import os
from pathlib import Path

from buarl.config import Config
from buarl.data import phantom


def resolve_root(cfg: Config) -> Path:
    """The data root of a run: the configured one, or a cached phantom of the same kind."""
    if cfg.data_root:
        return Path(cfg.data_root).expanduser()
    cache = os.environ.get("BUARL_CACHE")
    # LA's label grid reaches 8 scans (paper_la.yaml) and holds one out for validation
    return phantom.cached(cfg.dataset, Path(cache) if cache else None, cases=8 if cfg.dataset == "acdc" else 10)


# Every config field the loaders read: configs that agree on them load equal data, so a sweep
# loads each distinct setting once and shares it with its trials (tests/test_config_and_data.py
# records what the loaders read).
LOADER_FIELDS = ("dataset", "data_root", "labeled", "base", "val_cases", "test_cases", "image_size", "patch_size")


def data_key(cfg: Config) -> tuple:
    """What load_benchmark's result depends on (the base only as supervised or not: that
    decides whether the unlabeled pool is read)."""
    return tuple(cfg.base == "supervised" if f == "base" else repr(getattr(cfg, f)) for f in LOADER_FIELDS)


def load_benchmark(cfg: Config, root: Path | None = None):
    from buarl.data.acdc import AcdcData
    from buarl.data.la import LaData

    cls = AcdcData if cfg.dataset == "acdc" else LaData
    return cls(root or resolve_root(cfg), cfg)
