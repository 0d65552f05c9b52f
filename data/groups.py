"""Who each image of a split belongs to, for folds that keep a patient (or slide) on one side: read
from the dataset's manifest (folder layout) or its samples' metadata rows (shards), in the order the
engine reads the split's images (class folders sorted, then file names; shards in index order)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.metadata import MANIFEST
from data.tiling import dataset_root
from dinomx.errors import DataError
from dinomx.images import list_images
from dinomx.shards import is_sharded, metadata, read_index, read_shard

GROUPINGS = ("patient", "slide", "image")


def _rows(split) -> list[tuple[str, dict]]:
    """(image name, its metadata row or {}) of every image of ``split``."""
    if is_sharded(split):
        index = read_index(split)
        out = []
        for shard in index.shards:
            for key, parts in read_shard(index.url(shard)):
                rows = metadata(parts)
                out.append((key, rows.get(index.image) or next(iter(rows.values()), {})))
        return out
    paths, _, _ = list_images(split)
    root = dataset_root(split.resolve())
    if root is None or not (root / MANIFEST).is_file():
        return [(str(p), {}) for p in paths]
    manifest = pd.read_csv(root / MANIFEST, dtype=str).set_index("path")
    rows = manifest.to_dict("index")
    return [(str(p), rows.get(p.resolve().relative_to(root).as_posix(), {})) for p in paths]


def _group(row: dict, by: str) -> str | None:
    value = {"patient": row.get("patient_id") or row.get("case"), "slide": row.get("source")}.get(by)
    return None if value is None or pd.isna(value) or value == "" else str(value)


def groups_of(splits: list, by: str = "") -> tuple[list[str], str]:
    """One group per image over ``splits`` (in order) and the grouping used: ``by`` (patient, slide
    or image), or the finest that keeps a person together that the data records (patient or
    case, else slide or series, else each image by itself)."""
    if by and by not in GROUPINGS:
        raise DataError(f"group: expected one of {list(GROUPINGS)}, got {by!r}")
    rows = [item for split in splits for item in _rows(Path(split))]
    for grouping in ([by] if by else list(GROUPINGS)):
        if grouping == "image":
            return [name for name, _ in rows], "image"
        found = [_group(row, grouping) for _, row in rows]
        if all(found):
            return found, grouping
        if by:
            missing = next(name for (name, _), group in zip(rows, found) if group is None)
            raise DataError(f"group: {by} is not recorded for every image (e.g. {missing}); the manifest or shard "
                            "metadata holds patient_id or case for patients and source for slides")
    raise AssertionError("unreachable: image always groups")
