"""Image-folder datasets: ``root/<class>/<image>``; labels are the sorted class folder names."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def list_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset directory not found (expected <root>/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    if not paths:
        raise FileNotFoundError(f"{root}: no images found (expected <root>/<class>/<image>)")
    return paths, labels, classes


def load_image(path: str | Path, num_channels: int = 3) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB" if num_channels == 3 else "L")


def to_tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    def __init__(self, root: str | Path, num_channels: int = 3, transform: Callable | None = None):
        self.root = Path(root)
        self.paths, self.labels, self.classes = list_images(root)
        self.num_channels = num_channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        img = to_tensor(load_image(self.paths[index], self.num_channels))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]
