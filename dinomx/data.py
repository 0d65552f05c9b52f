"""Image-folder datasets as torch tensors: ``root/<class>/<image>``; labels are the sorted class
folder names (``dinomx.images`` reads the files)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinomx.images import list_images, load_image


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
