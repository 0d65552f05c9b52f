"""Writing tile datasets as shards (``dinomx.shards`` says what one holds and reads them).

    python -m data.shards images/train --out shards/train    # an existing tile folder, packed

Ingestion writes the shards of one unit (a slide, a CT series) by itself, in the process that
tiles it: ``<out>/shards/<split>/<unit>-00000.tar``, a new file each ``max_bytes``. A unit never
shares a shard, so adding a slide adds shards and leaves the others' bytes (and their DVC and
validation caches) as they were. Member times and owners are fixed: the same tiles make the same
bytes, and so the same md5.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data.inputs import file_md5, output_stem
from data.params import DEFAULT_SHARD_MB
from dinomx.errors import DataError, run_command
from dinomx.images import list_images, load_image
from dinomx.shards import INDEX, METADATA, Shard, ShardSet

SHARDS = "shards"
# How long an md5 remembered by size and modification time is trusted before it is read again.
TRUST_DAYS = 7.0


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, path: Path):
        self.file, self.md5, self.size = open(path, "wb"), hashlib.md5(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.md5.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


class Md5Memo:
    """md5 of files by (name, size, modification time), as DVC keeps them: an unchanged file is
    not read again to know it is unchanged, and one copied again (``dvc update``, a checkout) is
    read once to know it is the same. Size and time do not see damage that keeps them (bit rot, a
    restore with ``cp -p``): an md5 older than ``trust_days`` is computed again, and ``fresh``
    computes every one."""

    def __init__(self, path: Path, trust_days: float = TRUST_DAYS, fresh: bool = False):
        self.path, self.trust_s, self.fresh = path, trust_days * 86400, fresh
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):  # a cache: missing or damaged, it is built again
            self.known = {}
        self.used: dict[str, list] = {}
        self.computed = 0

    def md5(self, file: Path) -> str:
        stat = file.stat()
        # The path as given, links not followed: ingestion reads through a pseudonymous view, whose
        # links lead to names that must not be written down.
        key = f"{os.path.abspath(file)}:{stat.st_size}:{stat.st_mtime_ns}"
        entry = self.known.get(key)
        if self.fresh or not (isinstance(entry, list) and len(entry) == 2 and time.time() - entry[1] < self.trust_s):
            entry = self.known[key] = [file_md5(file), time.time()]
            self.computed += 1
        self.used[key] = entry
        return entry[0]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.used))  # files gone or changed since are forgotten
        os.replace(partial, self.path)


def inputs_memo(out: Path) -> Path:
    """Where ingestion remembers the md5 of the inputs of the dataset at ``out``: beside it, not in
    it (the dataset's bytes do not change with where and when its inputs were copied)."""
    return out.with_name(f".{out.name}.inputs-md5.json")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ShardWriter:
    """The shards of one unit in one split's folder."""

    folder: Path
    stem: str
    max_bytes: int
    unit: str = ""
    source: str = ""
    written: list[Shard] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _file: _Hashing | None = None
    _samples: int = 0
    _images: int = 0
    _labels: Counter = field(default_factory=Counter)

    def add(self, key: str, parts: dict[str, bytes], label: str | None = None, images: int = 1) -> None:
        if self._tar is not None and self._file.size >= self.max_bytes:
            self._close_shard()
        if self._tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = _Hashing(self.folder / self._name(len(self.written)))
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        for component, data in parts.items():
            info = tarfile.TarInfo(f"{key}.{component}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._samples += 1
        self._images += images
        if label is not None:
            self._labels[label] += 1

    def close(self) -> list[Shard]:
        if self._tar is not None:
            self._close_shard()
        return self.written

    def files(self) -> list[str]:
        """The shards written, and the one being written."""
        return [self._name(i) for i in range(len(self.written) + (self._tar is not None))]

    def _name(self, index: int) -> str:
        return f"{self.stem}-{index:05d}.tar"

    def _close_shard(self) -> None:
        self._tar.close()
        self._file.close()
        self.written.append(Shard(name=self._name(len(self.written)), samples=self._samples, bytes=self._file.size,
                                  md5=self._file.md5.hexdigest(), labels=tuple(sorted(self._labels)),
                                  unit=self.unit, source=self.source, images=self._images))
        self._tar, self._file, self._samples, self._images, self._labels = None, None, 0, 0, Counter()


@dataclass
class Sample:
    """One place being gathered: its images and their metadata rows, by component."""

    key: str
    split: str
    label: str
    images: dict[str, bytes] = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)

    def parts(self) -> dict[str, bytes]:
        return {**self.images, METADATA: json.dumps(self.rows, default=_plain).encode()}


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


def pack_folder(folder: str | Path, out: str | Path, max_bytes: int = DEFAULT_SHARD_MB << 20,
                split: str | None = None) -> ShardSet:
    """An image folder (``<folder>/<class>/<image>``) as a split of shards at ``out``, in the
    folder's order: for tiles cut elsewhere, to stream them like ingested ones. PNG files keep
    their bytes; other images are written as PNG."""
    folder, out = Path(folder), Path(out)
    paths, labels, classes = list_images(folder)
    writer = ShardWriter(out, "shard", max_bytes, source=folder.name)
    for path, label in zip(paths, labels):
        relative = path.relative_to(folder).as_posix()
        data = path.read_bytes() if path.suffix.lower() == ".png" else png_bytes(load_image(path))
        row = {"source": relative, "label": classes[label], "split": split or folder.name}
        key = output_stem(relative).replace(".", "_")
        writer.add(key, {"png": data, METADATA: json.dumps({"png": row}).encode()}, classes[label])
    shards = ShardSet(".", writer.close(), classes, "png", ["png"])
    (out / INDEX).write_text(shards.to_json())
    return shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack an image folder (<folder>/<class>/<image>) into shards")
    parser.add_argument("folder")
    parser.add_argument("--out", required=True, help="the split's shard folder to write")
    parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_MB, help="largest shard in MiB")

    def pack() -> None:
        if Path(args.out).exists():
            raise DataError(f"--out: {args.out} exists; give a new folder")
        shards = pack_folder(args.folder, args.out, args.shard_mb << 20)
        print(f"{args.out}: {shards.samples} images of {len(shards.classes)} classes in {len(shards.shards)} shard(s)")

    args = parser.parse_args(argv)
    return run_command("shards", pack)


if __name__ == "__main__":
    sys.exit(main())
