"""What one training step reads: an endless, seeded stream of image indices, and the multi-crop
views (with iBOT masks, label masks and magnification pairs) of each image."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from dinomx.augmentations import DataAugmentationDINO
from dinomx.config import DinoMXConfig
from dinomx.data import ImageFolderDataset, load_image, to_tensor
from dinomx.errors import DataError, MissingInput
from dinomx.masking import sample_mask


def mix(seed: int, value: int) -> int:
    return (seed * 1_000_003 + value) % (2**63)


class StreamSampler(Sampler):
    """Positions ``start..end`` of an endless stream of seeded epoch permutations, as
    ``(position, index)`` pairs. The position seeds the sample's augmentation, so a run resumed
    from a checkpoint (or read by more workers) sees exactly the same views.

    With ``shards`` > 1 (multi-expert training) the images are dealt round-robin into shards and
    training step ``s`` (``step_size`` positions) draws only from shard ``s % shards``."""

    def __init__(self, num_items: int, start: int, end: int, seed: int, shards: int = 1, step_size: int = 1):
        self.num_items, self.start, self.end, self.seed = num_items, start, end, seed
        self.shards, self.step_size = shards, step_size

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        current: dict[int, tuple[int, torch.Tensor]] = {}  # shard -> (epoch, its permutation)
        for position in range(self.start, self.end):
            step, offset = divmod(position, self.step_size)
            shard = step % self.shards
            items = range(shard, self.num_items, self.shards)
            local = (step // self.shards) * self.step_size + offset
            epoch = local // len(items)
            if current.get(shard, (None,))[0] != epoch:
                seed = mix(self.seed + 7919 * shard, epoch)
                current[shard] = (epoch, torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)))
            yield position, items[int(current[shard][1][local % len(items)])]


class CropDataset(Dataset):
    """Multi-crop views (and iBOT masks of the global crops) of an image folder, or (``views``) of
    images streamed from shards, which have neither label masks nor paired tiles here. The crops
    come with their photometric parameters; ``augment.collate`` applies them to a whole batch."""

    def __init__(self, images: ImageFolderDataset | None, cfg: DinoMXConfig):
        self.images = images
        self.augment = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std, cfg.dataset.augmentation)
        self.seed = cfg.train.seed
        self.ibot = cfg.ibot if cfg.ibot.loss_weight > 0 else None
        self.grid = cfg.crops.global_crops_size // cfg.student.patch_size
        self.masks = None
        if cfg.crops.label_masks_root:
            self.masks = _parallel_paths(images, Path(cfg.crops.label_masks_root), "crops.label_masks_root", "label mask")
        self.pairs = None
        if cfg.distillation.paired_root:
            self.pairs = _parallel_paths(images, Path(cfg.distillation.paired_root), "distillation.paired_root",
                                         "low-magnification pair")
            self.paired_size = cfg.crops.global_crops_size
            self.mean = torch.tensor(cfg.dataset.mean).view(-1, 1, 1)
            self.std = torch.tensor(cfg.dataset.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, list[torch.Tensor]]:
        position, index = key
        return self._views(self.images[index][0], position, index)

    def views(self, img: Image.Image, position: int) -> dict[str, list[torch.Tensor]]:
        return self._views(to_tensor(img), position, None)

    def _views(self, img: torch.Tensor, position: int, index: int | None) -> dict[str, list[torch.Tensor]]:
        generator = torch.Generator().manual_seed(mix(self.seed, position))
        label_mask = None
        if self.masks is not None:
            label_mask = to_tensor(load_image(self.masks[index], num_channels=1))[0]
            if label_mask.shape != img.shape[1:]:
                raise DataError(f"{self.masks[index]}: mask {tuple(label_mask.shape)} does not match its image {tuple(img.shape[1:])}")
        views = self.augment(img, generator, label_mask)
        if self.ibot is not None:
            views["masks"] = [
                sample_mask(self.grid, self.ibot.mask_ratio_min_max, self.ibot.mask_sample_probability, generator)
                for _ in views["global_crops"]
            ]
        if self.pairs is not None:
            low = to_tensor(load_image(self.pairs[index], self.images.num_channels)).unsqueeze(0)
            low = F.interpolate(low, size=(self.paired_size, self.paired_size), mode="bilinear", antialias=True)[0]
            views["paired"] = [(low - self.mean) / self.std]
        return views


def _parallel_paths(images: ImageFolderDataset, root: Path, key: str, what: str) -> list[Path]:
    """The file at each image's relative path under another root; all must exist."""
    paths = [root / path.relative_to(images.root) for path in images.paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingInput(f"{key}: {len(missing)} of {len(paths)} tiles have no {what}, e.g. {missing[0]}")
    return paths
