"""Image files as a backbone takes them, without torch: the folder layout of a dataset, and
8-bit RGB or greyscale images from whatever a file holds. The platform's data side (``data/``)
uses this too, so validating a dataset does not load torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinomx.errors import DataError, MissingInput

# GIF and WebP are read as their first frame.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


def list_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"{root}: dataset directory not found (expected <root>/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(index)
    if not paths:
        raise MissingInput(f"{root}: no images found (expected <root>/<class>/<image>)")
    return paths, labels, classes


# Modes with more than 8 bits per sample, and the full range of each. PIL's own conversion to
# "L"/"RGB" clips them at 255, so a 16-bit tile of 1000 and one of 40000 would look the same.
_WIDE_RANGES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
# Detectors write 10 to 14 significant bits into 16-bit files: dividing by the container's range
# turns a 14-bit image (0..16383) nearly black (0..64).
STORED_BITS = (8, 10, 12, 14, 16)
EXIF_ORIENTATION = 0x0112


# Ruifrok & Johnston stain vectors (as in scikit-image): rows are haematoxylin, eosin and DAB in
# optical density. The augmentation's stain jitter (torch) and ingestion's stain statistics
# (NumPy) both use these.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_HED_FROM_RGB = np.linalg.inv(np.array(RGB_FROM_HED))
# Optical density of an 8-bit value, -log(v / 255), floored as the jitter floors it.
_DENSITY = -np.log(np.maximum(np.arange(256) / 255.0, 1e-6))


def stain_means(rgb: np.ndarray) -> tuple[float, float]:
    """Mean haematoxylin and eosin concentration of an 8-bit RGB image (H, W, 3): the HED
    transform is linear in optical density, so its mean is the mean density's transform, and the
    mean density comes from each channel's histogram (no per-pixel float image)."""
    pixels = rgb.reshape(-1, 3)
    density = np.array([np.bincount(pixels[:, c], minlength=256) @ _DENSITY for c in range(3)]) / max(len(pixels), 1)
    hed = density @ _HED_FROM_RGB
    return float(hed[0]), float(hed[1])


def stored_bits(high: float) -> int:
    """The fewest common detector bit depths that hold ``high``."""
    return next((bits for bits in STORED_BITS if high <= 2**bits - 1), STORED_BITS[-1])


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (phones store pictures sideways and say so)."""
    return ImageOps.exif_transpose(img) if img.getexif().get(EXIF_ORIENTATION, 1) != 1 else img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``img`` once turned upright: from the header of a JPEG or TIFF; a PNG
    may keep its orientation after the pixels, so an unloaded one is decoded to find it."""
    width, height = img.size
    return (height, width) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def to_model_mode(img: Image.Image, num_channels: int = 3, value_range: tuple[float, float] | None = None) -> Image.Image:
    """``img`` upright, as the 8-bit "RGB" or "L" image a backbone takes.

    Integer images of more than 8 bits are scaled by the bit depth their values need (10, 12, 14
    or 16: ``stored_bits``), float images must lie in [0, 1]; values outside the range are
    refused, never clipped. ``value_range`` (low, high) forces the range instead, clipping what
    lies outside it, for a dataset whose images must share one scale."""
    img = upright(img)
    mode = "RGB" if num_channels == 3 else "L"
    if img.mode in _WIDE_RANGES:
        values = np.asarray(img, dtype=np.float64)
        if value_range is not None:
            low, high = value_range
            scaled = (values.clip(low, high) - low) * (255.0 / (high - low))
            return _as_mode(Image.fromarray(np.round(scaled).astype(np.uint8), "L"), mode)
        top = _WIDE_RANGES[img.mode]
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > top:
            kind = "float" if img.mode == "F" else f"{img.mode} integer"
            raise DataError(f"{kind} image with values in [{low:g}, {high:g}]; expected 0..{top:g} "
                            "(window or rescale it before sending)")
        if img.mode != "F":
            top = 2 ** stored_bits(high) - 1
        img = Image.fromarray(np.round(values * (255.0 / top)).astype(np.uint8), "L")
    return _as_mode(img, mode)


def _as_mode(img: Image.Image, mode: str) -> Image.Image:
    return img if img.mode == mode else img.convert(mode)


# What PIL raises for a file it cannot decode: an unknown header (UnidentifiedImageError, an
# OSError), a stream that ends early (OSError), a corrupt chunk (SyntaxError), or a size no tile has.
UNREADABLE = (OSError, SyntaxError, Image.DecompressionBombError)


# The first bytes of the formats read here: a file that starts like one and does not open is that
# format damaged, not another kind of file.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
              b"BM": "BMP", b"GIF87a": "GIF", b"GIF89a": "GIF"}


def image_problem(path: Path, exc: BaseException) -> str:
    """What is wrong with an image file that does not decode (one of ``UNREADABLE``), in the user's terms."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    if isinstance(exc, UnidentifiedImageError):
        with path.open("rb") as f:
            head = f.read(12)
        found = next((kind for signature, kind in SIGNATURES.items() if head.startswith(signature)),
                     "WebP" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else None)
        if found:
            return f"a {found} signature, then content that does not decode as {found} (corrupt or cut short, {size} bytes)"
        return f"its content is not a {path.suffix.lstrip('.').upper() or 'known'} image (unrecognised header)"
    if "truncated" in str(exc).lower() or isinstance(exc, SyntaxError):
        return f"truncated or corrupt after {size} bytes ({exc})"
    return f"{type(exc).__name__}: {exc}"


def load_image(path: str | Path, num_channels: int = 3) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return to_model_mode(img, num_channels)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable image ({image_problem(Path(path), exc)})") from None


def window_hu(hu, center: float, width: float):
    """Hounsfield units to [0, 1] through a CT window (e.g. soft tissue: 40 / 400); NumPy arrays
    and torch tensors alike (ingestion windows arrays, the CT augmentation tensors)."""
    return ((hu - (center - width / 2)) / width).clip(0, 1)
