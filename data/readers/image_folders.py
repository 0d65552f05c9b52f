"""Any folder of images -> 8-bit RGB or greyscale PNGs, its own splits kept or drawn per image."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from data.inputs import IngestError, Skipped, output_stem
from data.listing import UNLABELLED, check_on_error, resolve, source_files, split_of
from data.staging import Found, Staging, Target, Units, publish
from dinomx.errors import DataError
from dinomx.images import IMAGE_SUFFIXES, UNREADABLE, image_problem, to_model_mode


def ingest_images(raw: str | Path, out: str | Path, mode: str = "rgb", val_fraction: float = 0.2,
                  seed: int = 0, on_error: str = "refuse",
                  value_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """Any image folder as a dataset: ``<raw>/<split>/<class>/<image>`` keeps its splits,
    ``<raw>/<class>/<image>`` (or a flat folder, label ``unlabelled``) is split per image.
    Images are turned upright by their EXIF orientation; images of more than 8 bits are scaled by
    the bits their values use (``dinomx.images.to_model_mode``), or by ``value_range`` if given."""
    if mode not in ("rgb", "gray"):
        raise DataError(f"mode: expected 'rgb' or 'gray', got {mode!r}")
    if value_range is not None and not value_range[0] < value_range[1]:
        raise DataError(f"value_range: expected LOW < HIGH, got {value_range[0]:g}:{value_range[1]:g}")
    check_on_error(on_error)
    raw, out = resolve(raw, out)
    files, hidden = source_files(raw)
    images, skipped = [], list(hidden)
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped.append(Skipped(path, f"not an image file ({path.suffix or 'no extension'})"))
    has_splits = any(p.relative_to(raw).parts[0] in ("train", "val", "test") for p in images)

    def rows_of(path: Path, staging: Staging) -> list[dict]:
        relative = path.relative_to(raw)
        parts = relative.parts
        if has_splits:
            if parts[0] not in ("train", "val", "test"):
                raise IngestError(path, "outside train/, val/ and test/ while the folder has splits")
            split, rest = parts[0], parts[1:]
        else:
            split, rest = split_of(relative.as_posix(), val_fraction, seed), parts
        label = rest[0] if len(rest) > 1 else UNLABELLED
        try:
            with Image.open(path) as img:
                img.load()
                converted = to_model_mode(img, 3 if mode == "rgb" else 1, value_range)
        except DataError as exc:
            raise IngestError(path, str(exc)) from None
        except UNREADABLE as exc:
            raise IngestError(path, f"not a readable image ({image_problem(path, exc)})") from None
        out_path = f"{split}/{label}/{output_stem(relative)}.png"
        staging.save(converted, out_path, relative.as_posix())
        return [{"path": out_path, "modality": mode, "source": relative.as_posix(), "split": split, "label": label,
                 "source_mode": img.mode, "source_width": img.width, "source_height": img.height}]

    return publish(raw, Units(images, rows_of), Found(len(files) + len(hidden), skipped, []),
                   Target(out, on_error, val_fraction, extra={"value_range.json": json.dumps(value_range)} if value_range else {}))
