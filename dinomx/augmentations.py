"""Multi-crop augmentation of DINO, written on torch tensors (no torchvision dependency).

Images enter as float tensors in [0, 1], shape (C, H, W). Three photometric tables:

- ``rgb``: DINO's natural-image recipe (colour jitter, grayscale, blur, solarisation);
- ``ct``: radiology (any channel count): intensity only — brightness/contrast, Gaussian noise,
  blur; no colour jitter or solarisation, which would invent tissue densities;
- ``he``: H&E histology: stain jitter in HED space (Tellez et al., 2018), 90-degree rotations
  and vertical flips (slides have no up), blur.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from dinomx.config import ConfigError, CropsConfig
from dinomx.images import RGB_FROM_HED

# RGB <-> YIQ: a hue shift is a rotation of the chroma plane (I, Q).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _chance(p: float, generator: torch.Generator | None) -> bool:
    return p > 0 and torch.rand((), generator=generator).item() < p


def crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    center: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area; with ``center`` the box
    is placed around that pixel (as far as the borders allow) instead of anywhere."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * uniform(*scale, generator)
        aspect = math.exp(uniform(*log_ratio, generator))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            break
    else:  # fall back to the full image
        return 0, 0, height, width
    if center is None:
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
    else:
        top = min(max(center[0] - h // 2, 0), height - h)
        left = min(max(center[1] - w // 2, 0), width - w)
    return top, left, h, w


def random_resized_crop(
    img: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    center: tuple[int, int] | None = None,
) -> torch.Tensor:
    top, left, h, w = crop_box(img.shape[1], img.shape[2], scale, ratio, generator, center)
    crop = img[:, top : top + h, left : left + w].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def color_jitter(
    img: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    img = img * uniform(1 - brightness, 1 + brightness, generator)
    mean = (img * _LUMA).sum(0).mean()
    img = (img - mean) * uniform(1 - contrast, 1 + contrast, generator) + mean
    gray = (img * _LUMA).sum(0, keepdim=True)
    img = (img - gray) * uniform(1 - saturation, 1 + saturation, generator) + gray
    angle = uniform(-hue, hue, generator) * 2 * math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    transform = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
    img = torch.einsum("ij,jhw->ihw", transform, img)
    return img.clamp(0, 1)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    return (img * _LUMA).sum(0, keepdim=True).expand_as(img).clone()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = img.shape[0]
    out = img.unsqueeze(0)
    out = F.pad(out, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out[0]


def solarize(img: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(img >= threshold, 1 - img, img)


_RGB_FROM_HED = torch.tensor(RGB_FROM_HED)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def rgb_to_hed(img: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (haematoxylin, eosin, DAB) of an RGB image in [0, 1], shape (3, H, W)."""
    density = -torch.log(img.clamp_min(1e-6))
    return torch.einsum("chw,cs->shw", density, _HED_FROM_RGB)


def hed_jitter(img: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale (``alpha``) and shift (``beta``) each stain's concentration, per HED channel."""
    stains = rgb_to_hed(img)
    stains = stains * alpha.view(3, 1, 1) + beta.view(3, 1, 1)
    return torch.exp(-torch.einsum("shw,sc->chw", stains, _RGB_FROM_HED)).clamp(0, 1)


def intensity_jitter(img: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator | None) -> torch.Tensor:
    mean = img.mean()
    img = (img - mean) * uniform(1 - contrast, 1 + contrast, generator) + mean
    return (img + uniform(-brightness, brightness, generator)).clamp(0, 1)


class DataAugmentationDINO:
    """Two global crops (teacher and student) and N local crops (student only).

    Global crop 1 is always blurred, global crop 2 rarely and sometimes solarised; local crops
    are blurred half of the time — the asymmetric recipe of DINO.
    """

    def __init__(
        self,
        crops: CropsConfig,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        table: Literal["rgb", "gray", "ct", "he"] = "rgb",
    ):
        if table in ("rgb", "he") and len(mean) != 3:
            raise ConfigError(f"dataset.augmentation: {table!r} needs 3-channel images; use 'ct' for {len(mean)} channel(s)")
        self.crops = crops
        self.table = table
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def _photometric(self, img: torch.Tensor, blur_p: float, solarize_p: float, g: torch.Generator | None) -> torch.Tensor:
        if _chance(0.5, g):
            img = img.flip(-1)
        if self.table == "rgb":
            if _chance(0.8, g):
                img = color_jitter(img, generator=g)
            if _chance(0.2, g):
                img = grayscale(img)
        elif self.table == "he":
            if _chance(0.5, g):
                img = img.flip(-2)
            img = torch.rot90(img, int(torch.randint(0, 4, (), generator=g)), dims=(-2, -1))
            if _chance(0.8, g):
                sigma = 0.05
                alpha = 1 + (torch.rand(3, generator=g) * 2 - 1) * sigma
                beta = (torch.rand(3, generator=g) * 2 - 1) * sigma
                img = hed_jitter(img, alpha, beta)
            solarize_p = 0.0
        elif self.table == "gray":
            # Natural greyscale images: DINO's colour jitter without the colour (brightness and
            # contrast 0.4); solarisation stays, as for RGB.
            if _chance(0.8, g):
                img = intensity_jitter(img, brightness=0.4, contrast=0.4, generator=g)
        else:  # ct
            if _chance(0.8, g):
                img = intensity_jitter(img, brightness=0.1, contrast=0.2, generator=g)
            if _chance(0.5, g):
                # One acquisition's noise: CT channels are windows of the same HU values.
                noise = torch.randn((1, *img.shape[1:]), generator=g) * uniform(0.0, 0.03, g)
                img = (img + noise).clamp(0, 1)
            solarize_p = 0.0
        if _chance(blur_p, g):
            # DINO's sigma range is meant for 224 px crops; keep it relative to the crop size.
            img = gaussian_blur(img, uniform(0.1, 2.0, g) * img.shape[-1] / 224)
        if _chance(solarize_p, g):
            img = solarize(img)
        return (img - self.mean) / self.std

    def __call__(
        self, img: torch.Tensor, g: torch.Generator | None = None, label_mask: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """``g`` makes the views a function of the generator's seed alone (see ``dinomx.train``).

        With a ``label_mask`` (H, W; non-zero = annotated), each local crop is centred on a random
        annotated pixel with probability ``crops.label_guided_probability`` (DINO-LG)."""
        c = self.crops
        annotated = torch.nonzero(label_mask) if label_mask is not None else None
        global_crops = [
            self._photometric(random_resized_crop(img, c.global_crops_size, c.global_crops_scale, generator=g), blur_p, sol_p, g)
            for blur_p, sol_p in ((1.0, 0.0), (0.1, 0.2))
        ]
        local_crops = []
        for _ in range(c.local_crops_number):
            center = None
            if annotated is not None and len(annotated) and _chance(c.label_guided_probability, g):
                center = tuple(int(v) for v in annotated[int(torch.randint(0, len(annotated), (), generator=g))])
            crop = random_resized_crop(img, c.local_crops_size, c.local_crops_scale, generator=g, center=center)
            local_crops.append(self._photometric(crop, 0.5, 0.0, g))
        return {"global_crops": global_crops, "local_crops": local_crops}


def collate_crops(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stack each list-valued key view-major: (n_views * batch, ...), view i in rows [i*B, (i+1)*B).

    Keys with no views (no local crops) are left out."""
    return {
        key: torch.stack([s[key][v] for v in range(len(views)) for s in samples])
        for key, views in samples[0].items()
        if views
    }
