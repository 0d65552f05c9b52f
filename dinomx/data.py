"""Image-folder datasets as torch tensors: ``root/<class>/<image>``; labels are the sorted class
folder names (``dinomx.images`` reads the files). ``labelled_images`` and ``split_classes`` read a
split of shards (``dinomx.shards``) as well."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinomx.images import list_images, load_image, to_model_mode
from dinomx.shards import decode, is_sharded, label_index, read_index, read_shard


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


def split_classes(root: str | Path) -> list[str]:
    """The class names of a split: its class folders, or its shard index's classes."""
    return read_index(root).classes if is_sharded(root) else list_images(root)[2]


def labelled_images(root: str | Path, num_channels: int, limit: int | None = None,
                    first_of_each_class: bool = False) -> tuple[list, list[Image.Image], list[int], list[str]]:
    """Images of a split with their labels, in the split's order: (names: paths of a folder's
    files or keys of shards' samples, images, label indices, class names). ``limit``: the first
    so many; ``first_of_each_class``: only the first image of each class."""
    if is_sharded(root):
        shards = read_index(root)
        items = ((key, parts) for shard in shards.shards for key, parts in read_shard(shards.url(shard)))
        found = ((key, label_index(shards, key, parts), parts[shards.image]) for key, parts in items)
        load, classes = (lambda key, data: to_model_mode(decode(data, f"{root}: sample {key}"), num_channels)), shards.classes
    else:
        paths, labels, classes = list_images(root)
        found, load = zip(paths, labels, paths), (lambda _, path: load_image(path, num_channels))
    names, images, labels, seen = [], [], [], set()
    for name, label, source in found:
        if first_of_each_class and label in seen:
            continue
        seen.add(label)
        names.append(name), images.append(load(name, source)), labels.append(label)
        if len(images) == limit or (first_of_each_class and len(seen) == len(classes)):
            break
    return names, images, labels, classes
