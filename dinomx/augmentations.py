"""Multi-crop augmentation of DINO, written on torch tensors (no torchvision dependency).

Images enter as float tensors in [0, 1], shape (C, H, W). Work is split in two, so that the
photometric part runs once per batch rather than once per crop: for small images the
per-crop tensor calls, not the arithmetic, were most of a training step.

- ``DataAugmentationDINO.__call__`` (per image, in the dataset): the crops, and for each crop a
  row of photometric parameters drawn from the image's generator. The views stay a function of
  the generator's seed alone.
- ``DataAugmentationDINO.collate`` (per batch, in the DataLoader's worker): stacks the views and
  applies every crop's parameters to the whole batch at once, then normalises.

Four photometric tables:

- ``rgb``: DINO's natural-image recipe (colour jitter, grayscale, blur, solarisation);
- ``gray``: the same for natural greyscale images, with no colour to jitter;
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
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_RGB_FROM_HED = torch.tensor(RGB_FROM_HED)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)

# The photometric parameters of one crop, as columns of a row; a column the table does not use
# stays at its resting value. A probability-gated operation is at rest when its gate is 0.
PARAMS = ("hflip", "vflip", "rot90", "jitter", "brightness", "contrast", "saturation", "hue", "grayscale",
          "alpha_h", "alpha_e", "alpha_d", "beta_h", "beta_e", "beta_d", "noise", "noise_seed", "blur_sigma",
          "solarize")
_COLUMN = {name: i for i, name in enumerate(PARAMS)}
_AT_REST = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "alpha_h": 1.0, "alpha_e": 1.0, "alpha_d": 1.0}
NOISE_SEEDS = 2**24  # exactly representable in the float32 parameter row


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


# The batch operations below take images (N, C, H, W) and one parameter per image, shape (N,)
# or (N, 3); each is the identity at the resting value of its parameters.

def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (x * _LUMA).sum(1, keepdim=True).expand_as(x)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation factors, and a hue rotation (radians), of RGB images."""
    x = x * _per_image(brightness)
    mean = _per_image((x * _LUMA).sum(1).mean((1, 2)))
    x = (x - mean) * _per_image(contrast) + mean
    gray = (x * _LUMA).sum(1, keepdim=True)
    x = (x - gray) * _per_image(saturation) + gray
    cos, sin, zero, one = hue.cos(), hue.sin(), torch.zeros_like(hue), torch.ones_like(hue)
    rotate = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(-1, 3, 3)
    transform = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
    return torch.einsum("nij,njhw->nihw", transform, x).clamp(0, 1)


def intensity_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """A contrast factor about each image's mean, then a brightness shift, for any channel count."""
    mean = _per_image(x.mean((1, 2, 3)))
    return ((x - mean) * _per_image(contrast) + mean + _per_image(brightness)).clamp(0, 1)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (haematoxylin, eosin, DAB) of RGB images in [0, 1], shape (..., 3, H, W)
    (``dinomx.images.stain_means`` reads slides' stains the same way)."""
    density = -torch.log(x.clamp_min(1e-6))
    return torch.einsum("...chw,cs->...shw", density, _HED_FROM_RGB)


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale (``alpha``, (N, 3)) and shift (``beta``) each stain's concentration."""
    stains = rgb_to_hed(x) * alpha.view(-1, 3, 1, 1) + beta.view(-1, 3, 1, 1)
    return torch.exp(-torch.einsum("nshw,sc->nchw", stains, _RGB_FROM_HED)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own ``sigma`` (0: left as is), truncated at 2 sigma."""
    blurred = sigma > 0
    if not blurred.any():
        return x
    rows = x[blurred]
    n, channels, height, width = rows.shape
    sigma = sigma[blurred].view(-1, 1)
    radius = (2 * sigma).ceil().clamp_min(1)
    reach = int(radius.max())
    offsets = torch.arange(-reach, reach + 1, dtype=x.dtype)
    # A shared support as wide as the widest kernel; each kernel is zero past its own radius, so
    # the reflected border it reaches is the one its own padding would have made.
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2)) * (offsets.abs() <= radius)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    out = F.pad(rows.reshape(1, n * channels, height, width), (reach,) * 4, mode="reflect")
    out = F.conv2d(out, kernel.view(-1, 1, 1, 2 * reach + 1), groups=n * channels)
    out = F.conv2d(out, kernel.view(-1, 1, 2 * reach + 1, 1), groups=n * channels)
    x = x.clone()
    x[blurred] = out.view(n, channels, height, width)
    return x


def gaussian_noise(x: torch.Tensor, scale: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Each image plus a noise field of its own ``scale`` (0: left as is), drawn from its own
    ``seed`` so that it does not depend on the batch; one field for all channels."""
    noisy = torch.nonzero(scale > 0).flatten().tolist()
    if not noisy:
        return x
    x = x.clone()
    for i in noisy:
        field = torch.randn((1, *x.shape[2:]), generator=torch.Generator().manual_seed(int(seed[i])))
        x[i] = (x[i] + field * scale[i]).clamp(0, 1)
    return x


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1 - x, x)


def _where(gate: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_image(gate) > 0, changed, x)


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
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def draw(self, size: int, blur_p: float, solarize_p: float, g: torch.Generator | None) -> torch.Tensor:
        """The photometric parameters of one crop of ``size`` pixels (a row over ``PARAMS``)."""
        u = torch.rand(10, generator=g).tolist()
        p = dict(_AT_REST, hflip=float(u[0] < 0.5))
        if self.table == "rgb":
            p.update(jitter=float(u[1] < 0.8), brightness=0.6 + 0.8 * u[2], contrast=0.6 + 0.8 * u[3],
                     saturation=0.8 + 0.4 * u[4], hue=(u[5] - 0.5) * 0.2 * 2 * math.pi, grayscale=float(u[6] < 0.2))
        elif self.table == "he":
            stains = torch.rand(6, generator=g).mul(2).sub(1).mul(0.05).tolist()
            p.update(vflip=float(u[1] < 0.5), rot90=float(int(u[2] * 4)), jitter=float(u[3] < 0.8),
                     **dict(zip(("alpha_h", "alpha_e", "alpha_d"), (1 + s for s in stains[:3]))),
                     **dict(zip(("beta_h", "beta_e", "beta_d"), stains[3:])))
            solarize_p = 0.0
        elif self.table == "gray":
            # Natural greyscale images: DINO's colour jitter without the colour (brightness and
            # contrast 0.4); solarisation stays, as for RGB.
            p.update(jitter=float(u[1] < 0.8), contrast=0.6 + 0.8 * u[2], brightness=0.8 * u[3] - 0.4)
        else:  # ct
            # One acquisition's noise: CT channels are windows of the same HU values.
            p.update(jitter=float(u[1] < 0.8), contrast=0.8 + 0.4 * u[2], brightness=0.2 * u[3] - 0.1,
                     noise=0.03 * u[4] if u[5] < 0.5 else 0.0, noise_seed=float(int(u[6] * NOISE_SEEDS)))
            solarize_p = 0.0
        if u[7] < blur_p:
            # DINO's sigma range is meant for 224 px crops; keep it relative to the crop size.
            p["blur_sigma"] = (0.1 + 1.9 * u[8]) * size / 224
        p["solarize"] = float(u[9] < solarize_p)
        return torch.tensor([p.get(name, 0.0) for name in PARAMS])

    def photometric(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Crops (N, C, H, W) in [0, 1] with their parameter rows (N, len(PARAMS)), normalised."""
        p = {name: params[:, i] for name, i in _COLUMN.items()}
        x = _where(p["hflip"], x.flip(-1), x)
        if self.table == "rgb":
            x = _where(p["jitter"], color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"]), x)
            x = _where(p["grayscale"], grayscale(x), x)
        elif self.table == "he":
            x = _where(p["vflip"], x.flip(-2), x)
            turned = x.clone()
            for k in (1, 2, 3):
                rows = p["rot90"] == k
                turned[rows] = torch.rot90(x[rows], k, dims=(-2, -1))
            x = turned
            alpha = params[:, [_COLUMN[c] for c in ("alpha_h", "alpha_e", "alpha_d")]]
            beta = params[:, [_COLUMN[c] for c in ("beta_h", "beta_e", "beta_d")]]
            x = _where(p["jitter"], hed_jitter(x, alpha, beta), x)
        else:  # gray, ct
            x = _where(p["jitter"], intensity_jitter(x, p["brightness"], p["contrast"]), x)
            x = gaussian_noise(x, p["noise"], p["noise_seed"])
        x = gaussian_blur(x, p["blur_sigma"])
        x = _where(p["solarize"], solarize(x), x)
        return (x - self.mean) / self.std

    def __call__(
        self, img: torch.Tensor, g: torch.Generator | None = None, label_mask: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """The crops of one image, in [0, 1], and their photometric parameters (``collate``
        applies them). ``g`` makes the views a function of the generator's seed alone (see
        ``dinomx.train``).

        With a ``label_mask`` (H, W; non-zero = annotated), each local crop is centred on a random
        annotated pixel with probability ``crops.label_guided_probability`` (DINO-LG)."""
        c = self.crops
        annotated = torch.nonzero(label_mask) if label_mask is not None else None
        views: dict[str, list[torch.Tensor]] = {"global_crops": [], "global_params": [], "local_crops": [], "local_params": []}
        for blur_p, sol_p in ((1.0, 0.0), (0.1, 0.2)):
            views["global_crops"].append(random_resized_crop(img, c.global_crops_size, c.global_crops_scale, generator=g))
            views["global_params"].append(self.draw(c.global_crops_size, blur_p, sol_p, g))
        for _ in range(c.local_crops_number):
            center = None
            if annotated is not None and len(annotated) and _chance(c.label_guided_probability, g):
                center = tuple(int(v) for v in annotated[int(torch.randint(0, len(annotated), (), generator=g))])
            views["local_crops"].append(random_resized_crop(img, c.local_crops_size, c.local_crops_scale, generator=g, center=center))
            views["local_params"].append(self.draw(c.local_crops_size, 0.5, 0.0, g))
        return views

    def collate(self, samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """The batch of ``samples`` (``stack_views``), each crop with its photometric parameters
        applied."""
        batch = stack_views(samples)
        for kind in ("global", "local"):
            if f"{kind}_crops" in batch:
                batch[f"{kind}_crops"] = self.photometric(batch[f"{kind}_crops"], batch.pop(f"{kind}_params"))
        return batch


def stack_views(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stack each list-valued key view-major: (n_views * batch, ...), view i in rows [i*B, (i+1)*B).

    Keys with no views (no local crops) are left out."""
    return {
        key: torch.stack([s[key][v] for v in range(len(views)) for s in samples])
        for key, views in samples[0].items()
        if views
    }
