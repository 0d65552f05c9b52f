"""Tile datasets as shards: WebDataset-style tar files, read sequentially from a folder or a URL.

A shard holds whole samples, each a run of consecutive members named ``<key>.<component>``: the
images of one place (``20x.png``, ``10x.png`` for the magnifications of a slide tile, ``png`` for
a CT slice, ``mask.png`` for its annotation mask) and ``json``, one metadata row per image
component (source slide or series, case/patient, split, label, magnification, coordinates, ...).
Keys hold no dot, so the component is everything after the first one, as WebDataset reads it.

A split of a dataset is a folder (or URL prefix) of shards with an index, ``shards.json``: the
shards with their sample counts, bytes and md5, the class names, and the image component that
trains. Tar because it is read front to back in large requests (one GET per shard from an object
store), needs no library to write or inspect (``tar tf``), and is what WebDataset, the streaming
loaders of large vision pretraining, read. Nothing here loads torch: the data side writes and
validates shards with it.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dinomx.errors import DataError, MissingInput

INDEX = "shards.json"
FORMAT = "vision-foundry-shards/1"
METADATA = "json"
SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.=+-]*\.tar")
# No image or metadata row of a tile comes near this; a member that claims more is not read.
MAX_MEMBER_BYTES = 256 << 20


@dataclass(frozen=True)
class Shard:
    name: str  # file name in the split's folder
    samples: int
    bytes: int
    md5: str
    labels: tuple[str, ...] = ()
    # What made it (a slide or series: the content of its files and the ingestion options): an
    # unchanged unit keeps its shards when the dataset is ingested again.
    unit: str = ""
    source: str = ""  # the unit's input, relative to the raw folder
    images: int = 0  # image files (a sample holds one per magnification)


@dataclass
class ShardSet:
    """The shards of one split and where they are (a local folder, or a URL prefix)."""

    root: str
    shards: list[Shard]
    classes: list[str]
    image: str  # the component that trains, e.g. "20x.png"
    components: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def url(self, shard: Shard) -> str:
        return f"{self.root.rstrip('/')}/{shard.name}"

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "image": self.image, "components": self.components,
                           "classes": self.classes, "shards": [asdict(s) for s in self.shards]}, indent=1)


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def is_sharded(location: str | Path) -> bool:
    """A split given as a URL is read as shards (only shards stream); a local folder is one when
    it holds an index."""
    return is_url(location) or (Path(location) / INDEX).is_file()


def open_stream(url: str | Path, block_size: int = 8 << 20):
    """A binary file at a local path or any URL fsspec reads (``s3://`` through the endpoint and
    credentials of the environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)."""
    if not is_url(url):
        return open(url, "rb")
    from fsspec.core import url_to_fs  # only for URLs: a local dataset needs no filesystem layer

    fs, path = url_to_fs(str(url))
    return fs.open(path, "rb", block_size=block_size)


def read_index(location: str | Path) -> ShardSet:
    """The index of a split of shards at a folder or URL prefix."""
    where = f"{str(location).rstrip('/')}/{INDEX}"
    try:
        with open_stream(where) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise MissingInput(f"{location}: no {INDEX} (expected a split of a sharded dataset, e.g. tiles/shards/train)") from None
    except ValueError as exc:
        raise DataError(f"{where}: not a shard index ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{where}: format {raw.get('format') if isinstance(raw, dict) else None!r}, expected {FORMAT!r}")
    try:
        shards = [Shard(**{**s, "labels": tuple(s.get("labels", ()))}) for s in raw["shards"]]
        index = ShardSet(str(location), shards, [str(c) for c in raw["classes"]], str(raw["image"]),
                         [str(c) for c in raw.get("components", [])])
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{where}: not a shard index ({type(exc).__name__}: {exc}); expected the keys shards, "
                        "classes and image, and name, samples, bytes and md5 for each shard") from None
    if not shards:
        raise DataError(f"{where}: lists no shards")
    for shard in shards:
        # A name is a file beside the index: never a path that leads elsewhere.
        if not SHARD_NAME.fullmatch(shard.name) or not isinstance(shard.samples, int) or shard.samples < 1:
            raise DataError(f"{where}: shard {shard.name!r} with {shard.samples!r} samples; expected a file name "
                            "<name>.tar beside the index and a positive count")
    return index


def split_member(name: str) -> tuple[str, str]:
    """(key, component) of a member name."""
    key, dot, component = name.partition(".")
    if not dot:
        raise DataError(f"member {name!r}: expected <key>.<component>")
    return key, component


def _member_part(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str, str, bytes]:
    key, component = split_member(member.name)
    if member.size > MAX_MEMBER_BYTES:
        raise DataError(f"member {member.name!r} claims {member.size:,} bytes; a tile's image or metadata is under "
                        f"{MAX_MEMBER_BYTES:,}")
    return key, component, tar.extractfile(member).read()


def samples(stream, source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {component: bytes}) of each sample of a tar stream, in order, reading it once front
    to back."""
    key, parts = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, component, data = _member_part(tar, member)
                if name_key != key and key is not None:
                    yield key, parts
                    parts = {}
                key = name_key
                parts[component] = data
    except tarfile.TarError as exc:
        raise DataError(f"{source}: not a readable shard ({exc})") from None
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    if key is not None:
        yield key, parts


class ShardDamaged(DataError):
    """A shard whose bytes are not those its index recorded: a damaged copy, bit rot, a restore
    that kept the old modification time."""


def verified(url: str | Path, md5: str, spool_bytes: int = 64 << 20):
    """The shard at ``url`` as a readable file, once its bytes hash to ``md5``: a local file is
    hashed where it lies, a remote one is read once into a spool (memory, then a temp file) that
    is hashed on the way and then parsed, so that no sample of a damaged shard reaches training."""
    digest = hashlib.md5()
    if is_url(url):
        out = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
        with open_stream(url) as stream:
            while chunk := stream.read(8 << 20):
                digest.update(chunk)
                out.write(chunk)
        out.seek(0)
    else:
        with open(url, "rb") as stream:
            while chunk := stream.read(8 << 20):
                digest.update(chunk)
        out = open(url, "rb")
    if digest.hexdigest() != md5:
        out.close()
        raise ShardDamaged(f"{url}: md5 {digest.hexdigest()}, its index says {md5}: the shard's bytes changed after "
                           "it was indexed (a damaged copy or disk; restore it from the DVC remote with dvc checkout, "
                           "or ingest again)")
    return out


def read_shard(url: str | Path, md5: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, parts) of each sample of the shard at ``url``; given the index's ``md5``, only once
    the shard's bytes are checked against it."""
    try:
        stream = verified(url, md5) if md5 else open_stream(url)
    except FileNotFoundError:
        raise MissingInput(f"{url}: shard not found (its index lists it)") from None
    with stream:
        yield from samples(stream, str(url))


def metadata(parts: dict[str, bytes]) -> dict[str, dict]:
    """The sample's metadata rows, by image component."""
    if METADATA not in parts:
        return {}
    try:
        rows = json.loads(parts[METADATA])
    except ValueError as exc:
        raise DataError(f"a sample's {METADATA} is not JSON ({exc})") from None
    if not isinstance(rows, dict) or not all(isinstance(row, dict) for row in rows.values()):
        raise DataError(f"a sample's {METADATA} is not one row per image component")
    return rows


def label_index(shards: ShardSet, key: str, parts: dict[str, bytes]) -> int:
    """The class of a sample, as an index into the split's classes."""
    label = metadata(parts).get(shards.image, {}).get("label")
    if label not in shards.classes:
        raise DataError(f"{shards.root}: sample {key} is labelled {label!r}, not one of its index's classes "
                        f"{shards.classes}")
    return shards.classes.index(label)


def labelled_sample(shards: ShardSet, limit: int, seed: int, num_channels: int) -> tuple[list, list[str]]:
    """Up to ``limit`` images of a split and their labels, read front to back from shards in a
    seeded order, at most an eighth of them from any one shard (a shard is one slide or series)."""
    from dinomx.images import to_model_mode

    order = list(range(len(shards.shards)))
    random.Random(seed).shuffle(order)
    per_shard = max(1, -(-limit // min(8, len(order))))
    images, labels = [], []
    for j in order:
        for taken, (key, parts) in enumerate(read_shard(shards.url(shards.shards[j]))):
            if len(images) >= limit or taken >= per_shard:
                break
            labels.append(shards.classes[label_index(shards, key, parts)])
            images.append(to_model_mode(decode(parts[shards.image], f"{shards.url(shards.shards[j])}: sample {key}"), num_channels))
        if len(images) >= limit:
            break
    return images, labels


def decode(data: bytes, sample: str):
    """A sample's image; ``sample`` names it when the bytes do not decode."""
    from PIL import Image

    from dinomx.images import UNREADABLE

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UNREADABLE as exc:
        raise DataError(f"{sample}: not a readable image ({type(exc).__name__}: {exc})") from None
    return img
