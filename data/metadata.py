"""One metadata row per image file: what the validation suites look at.

An image folder gives rows of pixel statistics; a dataset made by ``data.ingest`` adds its
manifest (magnification, mpp, tissue fraction, stain statistics, Hounsfield ranges, spacing).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from data.inputs import IngestError, within
from data.tiling import TILING
from dinomx.errors import MissingInput
from dinomx.images import IMAGE_SUFFIXES
from dinomx.shards import METADATA, metadata, read_shard

MANIFEST = "manifest.csv"
# Below this standard deviation (of 0..255 values) an image is flat: no texture to learn from.
BLANK_STD = 1.0
# Below this spread between darkest and brightest value (of 0..255) an image is faint.
FAINT_RANGE = 85.0

COLUMNS = ["path", "split", "label", "readable", "error", "format", "mode", "channels", "dtype",
           "width", "height", "pixel_min", "pixel_max", "pixel_mean", "pixel_std", "dynamic_range", "has_nan", "bytes"]


def image_row(path: Path, root: Path) -> dict:
    """Describe one file; an unreadable file yields a row saying why rather than an exception."""
    relative = path.relative_to(root)
    return pixel_row(path, relative.as_posix(), path.stat().st_size,
                     split=relative.parts[0] if len(relative.parts) == 3 else None,
                     label=relative.parts[-2] if len(relative.parts) >= 2 else None)


def pixel_row(source, name: str, size: int, **known) -> dict:
    """The row of one image (a path or a file object) named ``name``."""
    row = dict.fromkeys(COLUMNS)
    row.update(path=name, readable=False, bytes=size, **known)
    try:
        with Image.open(source) as img:
            img.load()
            pixels = np.asarray(img)
            row.update(format=img.format, mode=img.mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    values = pixels.astype(np.float64)
    row.update(
        readable=True,
        channels=1 if pixels.ndim == 2 else int(pixels.shape[2]),
        dtype=str(pixels.dtype),
        height=int(pixels.shape[0]),
        width=int(pixels.shape[1]),
        has_nan=bool(np.isnan(values).any()),
        pixel_min=float(np.nanmin(values)),
        pixel_max=float(np.nanmax(values)),
        pixel_mean=float(np.nanmean(values)),
        pixel_std=float(np.nanstd(values)),
        dynamic_range=float(np.nanmax(values) - np.nanmin(values)),
    )
    return row


def shard_metadata(path: Path, name: str) -> pd.DataFrame:
    """Rows for every image of a shard (``name``: its path in the dataset): the metadata row the
    sample carries plus the pixel statistics of the image, named ``<shard>:<member>``."""
    rows = []
    for key, parts in read_shard(path):
        entries = metadata(parts)
        for component, data in parts.items():
            if component == METADATA:
                continue
            entry = entries.get(component)
            if entry is None and component != "mask.png":
                entry = {}  # an image without its metadata row: the suite's null checks name it
            if entry is not None:
                rows.append({**pixel_row(io.BytesIO(data), f"{name}:{key}.{component}", len(data)), **entry})
    if not rows:
        return pd.DataFrame(columns=COLUMNS + ["is_image_file"])
    return _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["is_image_file"] = frame["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if "series_uid" in frame:
        # Measured on the files, not taken from the manifest's own ``blank`` column.
        flat = frame["pixel_std"].astype(float).fillna(0.0) < BLANK_STD
        frame["series_blank_fraction"] = flat.groupby(frame["series_uid"].fillna(frame["path"])).transform("mean")
    return frame


def image_folder_metadata(root: Path) -> pd.DataFrame:
    """Rows for every file under ``root`` (``<split>/<class>/<image>``), images or not; its own
    record of how the images were cut (``tiling.json`` at the top) is not one of them."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and not (p.parent == root and p.name == TILING))
    return _frame([image_row(p, root) for p in files])


def manifest_metadata(root: Path) -> pd.DataFrame:
    """Rows for every file the manifest lists: its columns plus the pixel statistics of the file."""
    root = root.resolve()
    rows = []
    for entry in pd.read_csv(root / MANIFEST).to_dict("records"):
        try:
            path = within(root, entry["path"])
            row = image_row(path, root) if path.is_file() else {"path": entry["path"], "readable": False,
                                                                  "error": "listed in the manifest but missing"}
        except IngestError as exc:
            row = {"path": entry["path"], "readable": False, "error": exc.problem}
        rows.append({**row, **entry})
    return _frame(rows)


def dataset_metadata(root: str | Path) -> pd.DataFrame:
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"{root}: dataset directory not found")
    return manifest_metadata(root) if (root / MANIFEST).is_file() else image_folder_metadata(root)
