"""Datasets in the reference layouts, and the phantom used when no data root is given."""
from __future__ import annotations

import os
from pathlib import Path

from buarl.config import Config
from buarl.data import phantom
from buarl.errors import DataError


def resolve_root(cfg: Config) -> Path:
    """The data root of a run: the configured one, or a cached phantom of the same kind."""
    if cfg.data_root:
        return Path(cfg.data_root).expanduser()
    cache = os.environ.get("BUARL_CACHE")
    # LA's label grid reaches 8 scans (paper_la.yaml) and holds one out for validation
    return phantom.cached(cfg.dataset, Path(cache) if cache else None, cases=8 if cfg.dataset == "acdc" else 10)


def origin(cfg: Config) -> dict:
    """What a run trained on, for its model card, MLflow run and tables: the dataset's name
    (with "phantom" for buarl's synthetic data), whether it is synthetic, and the root."""
    from buarl.prepare import read_info
    root = resolve_root(cfg)
    synthetic = cfg.data_root is None or (root / phantom.MARKER).is_file()
    try:
        prepared = read_info(root)
    except DataError:  # describing a run never fails it: the data checks report this file
        prepared = None
    name = prepared["name"] if prepared else cfg.dataset.upper() + (" phantom" if synthetic else "")
    return {"name": name, "synthetic": synthetic, "root": str(root), "digest": lists_digest(root),
            "train_cases": train_cases(root, cfg.dataset, prepared=prepared is not None)}


def train_cases(root: Path, dataset: str, prepared: bool) -> int | None:
    """Training cases of the root (ACDC: patients of train_slices.list; LA and a prepared
    root: cases of train.list): what a label ratio is a share of. None where the list cannot
    be read."""
    from buarl.data.acdc import patient_of
    try:
        if prepared or dataset != "acdc":
            return len((Path(root) / "train.list").read_text().split()) or None
        names = (Path(root) / "train_slices.list").read_text().split()
        return len({patient_of(n) for n in names}) or None
    except OSError:
        return None


def lists_digest(root: Path) -> str | None:
    """12 hex digits over the root's case lists (names and contents): which cases, in which
    splits; None where the root cannot be read here."""
    import hashlib
    try:
        lists = sorted(Path(root).glob("*.list"))
        h = hashlib.sha256()
        for f in lists:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    except OSError:
        return None
    return h.hexdigest()[:12] if lists else None


# Every config field the loaders read: configs that agree on them load equal data, so a sweep
# loads each distinct setting once and shares it with its trials (tests/test_config_and_data.py
# records what the loaders read).
LOADER_FIELDS = ("dataset", "data_root", "labeled", "base", "val_cases", "test_cases", "image_size", "patch_size",
                 "class_names", "in_channels")


def data_key(cfg: Config) -> tuple:
    """What load_benchmark's result depends on (the base only as supervised or not: that
    decides whether the unlabeled pool is read)."""
    return tuple(cfg.base == "supervised" if f == "base" else repr(getattr(cfg, f)) for f in LOADER_FIELDS)


def load_benchmark(cfg: Config, root: Path | None = None):
    from buarl.data.acdc import AcdcData
    from buarl.data.la import LaData

    cls = AcdcData if cfg.dataset == "acdc" else LaData
    return cls(root or resolve_root(cfg), cfg)
