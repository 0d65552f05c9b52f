"""Real images, and the same images under the shifts a served model meets, for checking the drift
watch (``dinomx.drift``): the tests and ``benchmarks/drift_watch.py`` build their sets here.

- ``he_tiles``: tissue tiles of a real H&E slide (the tests' CMU-1 region), 64 px at the scan's
  power reduced to ``size`` (half the magnification), at random places on the tissue.
- ``ct_patches``: patches of pydicom's real CT slice (``CT_small.dcm``) under a CT window.
- shifts: ``stain`` (haematoxylin and eosin scaled in HED space, far beyond the +-5 % of
  training's jitter: another lab's protocol), ``blur`` (a smoother reconstruction kernel, a
  scanner out of focus), ``ct_patches`` under another window (a series sent with the lung window),
  and another domain entirely (``data.samples``' digits).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from dinomx.images import RGB_FROM_HED

SOFT_TISSUE = (40.0, 400.0)  # window level, width in HU
LUNG = (-600.0, 1500.0)
_HED_FROM_RGB = np.linalg.inv(np.asarray(RGB_FROM_HED))


def he_tiles(slide_path: str, count: int, size: int = 32, seed: int = 0, min_tissue: float = 0.5) -> np.ndarray:
    """``count`` RGB tiles (count, size, size, 3) from places on the slide that are mostly tissue."""
    import openslide

    with openslide.OpenSlide(slide_path) as slide:
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    rng = np.random.default_rng(seed)
    tiles, tries = [], 0
    while len(tiles) < count:
        tries += 1
        if tries > 50 * count:
            raise ValueError(f"{slide_path}: fewer than {count} tiles of tissue found")
        y, x = rng.integers(0, region.shape[0] - 64), rng.integers(0, region.shape[1] - 64)
        patch = region[y:y + 64, x:x + 64]
        if (patch.min(axis=2) < 200).mean() >= min_tissue:  # not the glass's white
            tiles.append(np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(tiles)


def ct_patches(count: int, window: tuple[float, float] = SOFT_TISSUE, size: int = 32, seed: int = 0) -> np.ndarray:
    """``count`` grey patches (as RGB) of pydicom's CT slice, in Hounsfield units through ``window``."""
    import pydicom
    from pydicom.data import get_testdata_file

    scan = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = scan.pixel_array * float(scan.RescaleSlope) + float(scan.RescaleIntercept)
    level, width = window
    grey = (np.clip((hu - level + width / 2) / width, 0, 1) * 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    patches = []
    for _ in range(count):
        y, x = rng.integers(0, grey.shape[0] - size), rng.integers(0, grey.shape[1] - size)
        patch = np.rot90(grey[y:y + size, x:x + size], rng.integers(4))
        patches.append(np.repeat(patch[..., None], 3, axis=2))
    return np.stack(patches)


def stain(tiles: np.ndarray, haematoxylin: float = 1.6, eosin: float = 0.6) -> np.ndarray:
    """The tiles as another lab's staining would give them: each stain's concentration scaled."""
    density = -np.log(np.clip(tiles.astype(np.float64) / 255, 1e-6, 1))
    stains = density @ _HED_FROM_RGB * np.asarray([haematoxylin, eosin, 1.0])
    return (np.clip(np.exp(-(stains @ np.asarray(RGB_FROM_HED))), 0, 1) * 255).astype(np.uint8)


def blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma))) for img in images])


def as_images(array: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(a) for a in array]
