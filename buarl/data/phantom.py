"""Synthetic datasets in the exact reference layouts (SSL4MIS ACDC, UA-MT LA).

The phantoms exist so that the product and its tests run without the real data: same
folders, list files, h5 keys, dtypes and value ranges, deterministic per seed.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import h5py
import numpy as np


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")


def _cardiac_volume(rng: np.random.Generator, depth: int, h: int, w: int, frame: int):
    """Short-axis stack: LV cavity (3) inside a myocardium ring (2), RV crescent (1)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.45, 0.6)
    r_lv = min(h, w) * rng.uniform(0.10, 0.14) * (0.8 if frame == 2 else 1.0)  # ES is smaller
    thick = r_lv * rng.uniform(0.45, 0.65)
    angle = rng.uniform(0, 2 * np.pi)
    bright = rng.uniform(0.7, 0.95)
    image = np.zeros((depth, h, w), np.float32)
    label = np.zeros((depth, h, w), np.uint8)
    for z in range(depth):
        taper = 1.0 - 0.5 * abs(z - depth / 2) / (depth / 2)  # apex and base are smaller
        lv, myo_out = r_lv * taper, (r_lv + thick) * taper
        d = np.hypot(yy - cy, xx - cx)
        ry, rx = cy + np.sin(angle) * myo_out * 1.4, cx + np.cos(angle) * myo_out * 1.4
        d_rv = np.hypot((yy - ry) / 1.0, (xx - rx) / 1.6)
        rv = (d_rv < myo_out * 1.1) & (d > myo_out)
        lab = np.zeros((h, w), np.uint8)
        lab[rv] = 1
        lab[(d >= lv) & (d < myo_out)] = 2
        lab[d < lv] = 3
        tissue = 0.15 + 0.1 * np.sin(xx / rng.uniform(5, 9)) * np.cos(yy / rng.uniform(5, 9))
        img = tissue + np.select([lab == 3, lab == 2, lab == 1], [bright, 0.35, bright * 0.85], 0)
        img = img + rng.normal(0, 0.06, img.shape)
        image[z], label[z] = np.clip(img, 0, 1), lab
    return image, label


# Written into every phantom's root: what trains on it, and every model, table and MLflow
# run made from that, says it saw synthetic data (buarl.data.origin).
MARKER = "PHANTOM.json"


def mark(out: Path, kind: str, cases: int, seed: int) -> None:
    (Path(out) / MARKER).write_text(json.dumps(
        {"synthetic": True, "kind": kind, "cases": cases, "seed": seed,
         "note": "buarl's synthetic phantom: shapes in the benchmark's layout, not real scans"}, indent=2) + "\n")


def make_acdc(out: Path, cases: int = 8, seed: int = 0) -> Path:
    """`cases` training patients (2 frames each) plus val and test patients."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    n_eval = max(1, cases // 4)
    groups = {"train": cases, "val": n_eval, "test": n_eval}
    lists: dict[str, list[str]] = {k: [] for k in groups}
    slices: list[str] = []
    pid = 1
    for split, n in groups.items():
        for _ in range(n):
            depth, h, w = int(rng.integers(6, 11)), int(rng.integers(72, 113)), int(rng.integers(72, 113))
            for frame in (1, 2):
                case = f"patient{pid:03d}_frame{frame:02d}"
                image, label = _cardiac_volume(rng, depth, h, w, frame)
                lists[split].append(case)
                if split == "train":
                    for k in range(depth):
                        _write_h5(out / "data" / "slices" / f"{case}_slice_{k}.h5", image[k], label[k])
                        slices.append(f"{case}_slice_{k}")
                else:
                    _write_h5(out / "data" / f"{case}.h5", image, label)
            pid += 1
    (out / "train_slices.list").write_text("\n".join(slices) + "\n")
    for split, names in lists.items():
        (out / f"{split}.list").write_text("\n".join(names) + "\n")
    mark(out, "acdc", cases, seed)
    return out


def _atrium_volume(rng: np.random.Generator, shape: tuple[int, int, int]):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    c = rng.uniform(-0.15, 0.15, 3)
    radii = rng.uniform(0.3, 0.45, 3)
    r = np.sqrt(((x - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((z - c[2]) / radii[2]) ** 2)
    wobble = 0.12 * np.sin(3 * np.arctan2(y - c[1], x - c[0]) + rng.uniform(0, 6)) * np.cos(2 * z)
    label = (r + wobble < 1.0).astype(np.uint8)
    image = 1.5 * label + 0.3 * np.sin(4 * x) * np.cos(3 * y) + rng.normal(0, 0.5, shape)
    image = (image - image.mean()) / image.std()  # UA-MT's z-scoring
    return image.astype(np.float32), label


def make_la(out: Path, cases: int = 8, seed: int = 0) -> Path:
    """`cases` training scans and max(2, cases // 2) test scans."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    alphabet = np.array(list(string.ascii_uppercase + string.digits))
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, n in (("train", cases), ("test", max(2, cases // 2))):
        for _ in range(n):
            scan = "".join(rng.choice(alphabet, 20))
            shape = (int(rng.integers(56, 73)), int(rng.integers(56, 73)), 48)
            image, label = _atrium_volume(rng, shape)
            _write_h5(out / "2018LA_Seg_Training Set" / scan / "mri_norm2.h5", image, label)
            lists[split].append(scan)
    for split, names in lists.items():
        (out / f"{split}.list").write_text("\n".join(names) + "\n")
    mark(out, "la", cases, seed)
    return out


def make(kind: str, out: Path, cases: int = 8, seed: int = 0) -> Path:
    return {"acdc": make_acdc, "la": make_la}[kind](out, cases=cases, seed=seed)


def cached(kind: str, cache_dir: Path | None = None, cases: int = 8, seed: int = 0) -> Path:
    """The phantom used when no data root is given, generated once into a cache folder."""
    base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "buarl"
    root = base / f"phantom-{kind}-c{cases}-s{seed}"
    done = root / ".complete"
    if done.exists() and not (root / MARKER).exists():  # cached by a version before the marker
        mark(root, kind, cases, seed)
    if not done.exists():
        tmp = root.with_name(root.name + ".tmp")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        make(kind, tmp, cases=cases, seed=seed)
        (tmp / ".complete").write_text("ok\n")
        if root.exists():
            import shutil
            shutil.rmtree(root)
        tmp.rename(root)
    return root
