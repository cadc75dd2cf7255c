"""LA in the UA-MT layout: `2018LA_Seg_Training Set/<ID>/mri_norm2.h5` per scan."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from buarl.config import Config, num_classes_of
from buarl.data.augment import augment_3d, random_crop_3d
from buarl.data.checks import check_prepared, inside, read_case, read_image, read_list, require_root
from buarl.data.types import Case
from buarl.errors import DataError

SCANS = "2018LA_Seg_Training Set"


class LaData:
    num_classes = 2
    dim = 3

    def __init__(self, root: Path, cfg: Config):
        self.root = root = require_root(root, "LA (UA-MT)")
        self.num_classes = num_classes_of(cfg.dataset, cfg.class_names)
        self.channels = cfg.in_channels
        check_prepared(root, cfg)
        train_list = root / "train.list"
        names = read_list(train_list)
        # Validation scans come from the tail of train.list (never labeled in the 5/10/20%
        # protocols), so model selection never looks at the test scans.
        n_val = cfg.val_cases
        if cfg.labeled + n_val > len(names):
            raise DataError(f"labeled={cfg.labeled} + val_cases={n_val} scans, but {train_list} "
                            f"lists only {len(names)}")
        train_names = names[: len(names) - n_val]
        if cfg.base != "supervised" and cfg.labeled == len(train_names):
            raise DataError(f"labeled={cfg.labeled} uses every training scan of {train_list}: "
                            f"base={cfg.base} needs unlabeled scans left")
        keep = train_names if cfg.base != "supervised" else train_names[: cfg.labeled]
        # the unlabeled pool: images only (the loop never reads their labels)
        self.train = [self._case(n, train_list) if i < cfg.labeled else self._image(n, train_list)
                      for i, n in enumerate(keep)]
        self.labeled_idx = list(range(cfg.labeled))
        self.unlabeled_idx = list(range(cfg.labeled, len(keep)))
        self.val = [self._case(n, train_list) for n in names[len(names) - n_val:]] if n_val else []
        test_list = root / "test.list"
        test_names = read_list(test_list)
        self.test = [self._case(n, test_list) for n in test_names[: cfg.test_cases or None]]
        self.patch = list(cfg.patch_size)

    def _case(self, name: str, list_file: Path) -> Case:
        path = inside(self.root, f"{SCANS}/{name}/mri_norm2.h5", list_file)
        return Case(name, *read_case(path, self.num_classes, 3, self.channels))

    def _image(self, name: str, list_file: Path) -> Case:
        image = read_image(inside(self.root, f"{SCANS}/{name}/mri_norm2.h5", list_file), 3, self.channels)
        return Case(name, image, np.zeros(image.shape[-3:], np.uint8))

    def batch(self, idx: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The scans `idx`, each cropped to the patch and augmented, on the host."""
        images, labels = [], []
        for i in idx:
            image, label = random_crop_3d(self.train[i].image, self.train[i].label, self.patch, gen)
            image = torch.from_numpy(image.copy())
            image, label = augment_3d(image[None] if image.dim() == 3 else image,
                                      torch.from_numpy(label.astype("int64")), gen)
            images.append(image)
            labels.append(label)
        return torch.stack(images), torch.stack(labels)
