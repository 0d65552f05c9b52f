"""How a dataset is ingested, declared once: the options of ``python -m data.ingest`` and of
``python -m data.dataset add``, and the command line the dataset's DVC stage runs."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from data.inputs import CHANNELS
from dinomx.errors import UserError

MODALITIES = ("he", "ct", "rgb", "gray")
ON_ERROR = ("refuse", "quarantine")
LAYOUTS = ("shards", "folder")
# Slides and CT series make millions of tiles: they are written as shards unless told otherwise.
SHARDED = ("he", "ct")
DEFAULT_SHARD_MB = 1024


class ParamsError(UserError, ValueError):
    """Ingestion options that do not make a dataset."""


def _pair(text: str) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers A:B, e.g. 0:4095, got {text!r}") from None
    return first, second


def _windows(text: str) -> tuple[tuple[float, float], ...]:
    # One argument, not three: argparse would take "-600:1500" for an option.
    try:
        return tuple(_pair(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected CENTER:WIDTH,CENTER:WIDTH,CENTER:WIDTH in HU, "
                                         f"e.g. 40:400,-600:1500,400:1800, got {text!r}") from None


@dataclass(frozen=True)
class IngestParams:
    modality: str  # he | ct | rgb | gray
    val_fraction: float = 0.2
    seed: int = 0
    on_error: str = "refuse"  # refuse | quarantine
    magnifications: tuple[float, ...] = (20.0, 10.0, 5.0)  # he, highest first
    tile_size: int = 224  # he
    min_tissue: float = 0.5  # he
    cases: str | None = None  # he: CSV of slide -> case
    lenient_annotations: bool = False  # he
    annotations: str | None = None  # he: folder of <slide path>.geojson (corrected masks), instead of beside each slide
    window: tuple[float, float] = (40.0, 400.0)  # ct: center, width (HU)
    channels: str = "single"  # ct: single | 2.5d | windows
    windows: tuple[tuple[float, float], ...] | None = None  # ct: the three of channels=windows
    thickness: tuple[float, float] | None = None  # ct: series of this slice thickness only (mm)
    kernels: tuple[str, ...] = ()  # ct: series of these convolution kernels only
    labels: tuple[str, ...] = ()  # ct: top folders that name a class, kept by name (others are pseudonymised)
    value_range: tuple[float, float] | None = None  # rgb/gray: the range of wide images, forced
    workers: int = 0  # he: slides tiled at once, one process each; 0: one per core
    layout: str | None = None  # shards | folder; None: shards for he and ct, folder for rgb and gray
    shard_mb: int = DEFAULT_SHARD_MB  # largest shard (MiB)

    def __post_init__(self):
        for name, value, allowed in (("modality", self.modality, MODALITIES), ("channels", self.channels, CHANNELS),
                                     ("on_error", self.on_error, ON_ERROR)):
            if value not in allowed:
                raise ParamsError(f"{name}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        if not 0 <= self.val_fraction < 1:
            raise ParamsError(f"val_fraction: expected a fraction in [0, 1), got {self.val_fraction}")
        if self.windows is not None and len(self.windows) != 3:
            raise ParamsError(f"windows: three CENTER:WIDTH pairs make the three channels, got {len(self.windows)}")
        if self.workers < 0:
            raise ParamsError(f"workers: expected 0 (one per core) or more, got {self.workers}")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ParamsError(f"value_range: expected LOW:HIGH with LOW < HIGH, got {self.value_range}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ParamsError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}")
        if self.layout == "shards" and self.modality not in SHARDED:
            raise ParamsError(f"layout: shards are written for slides and CT series (he, ct); {self.modality} "
                              "image folders stay folders")
        if self.shard_mb < 1:
            raise ParamsError(f"shard_mb: expected a size in MiB of 1 or more, got {self.shard_mb}")

    @property
    def sharded(self) -> bool:
        return self.layout == "shards" or (self.layout is None and self.modality in SHARDED)

    @property
    def images(self) -> str:
        """The folder of the dataset that trains: its shards, grid tiles at the highest
        magnification, slices, or the converted image folder (each holding train/ and val/)."""
        if self.sharded:
            return "tiles/shards"
        return {"he": f"tiles/{max(self.magnifications):g}x", "ct": "tiles/slices"}.get(self.modality, "tiles")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Every option but the modality, which each command takes its own way."""
        parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases/patients in val")
        parser.add_argument("--seed", type=int, default=0, help="of the train/val split")
        parser.add_argument("--on-error", choices=ON_ERROR, default="refuse",
                            help="an unreadable input: refuse the whole export (default), or quarantine it "
                                 "(set aside, listed in refused.csv) and build the dataset from the rest")
        parser.add_argument("--magnifications", type=float, nargs="+", default=[20, 10, 5], help="he: highest first")
        parser.add_argument("--tile-size", type=int, default=224, help="he: tile side in pixels")
        parser.add_argument("--min-tissue", type=float, default=0.5, help="he: minimum tissue fraction of a tile")
        parser.add_argument("--workers", type=int, default=0,
                            help="he: slides tiled at once, one process each (default 0: one per core)")
        parser.add_argument("--cases", help="he: CSV with columns slide (relative to the raw folder) and case: the split unit")
        parser.add_argument("--annotations", help="he: folder of <slide path>.geojson annotations (corrected masks back "
                                                   "from annotators), read instead of a .geojson beside each slide")
        parser.add_argument("--lenient-annotations", action="store_true",
                            help="he: leave out unclassified or non-polygon annotations with a warning instead of refusing")
        parser.add_argument("--window", type=float, nargs=2, default=[40, 400], metavar=("CENTER", "WIDTH"),
                            help="ct: HU window of the written slices")
        parser.add_argument("--channels", choices=CHANNELS, default="single",
                            help="ct: single (grey), 2.5d (slices i-1, i, i+1) or windows (three windows of slice i)")
        parser.add_argument("--windows", type=_windows, metavar="C:W,C:W,C:W",
                            help="ct: the three windows of --channels windows, e.g. --windows=40:400,-600:1500,400:1800")
        parser.add_argument("--thickness", type=float, nargs=2, metavar=("MIN", "MAX"),
                            help="ct: keep series of this slice thickness (mm)")
        parser.add_argument("--kernel", action="append", default=[], dest="kernels",
                            help="ct: keep series of this convolution kernel (repeatable)")
        parser.add_argument("--label", action="append", default=[], dest="labels",
                            help="ct: a top folder that names a class (<raw>/<label>/...), kept by its name "
                                 "(repeatable); any other folder name is pseudonymised, as exports name folders "
                                 "after patients")
        parser.add_argument("--layout", choices=LAYOUTS, default=None,
                            help="he/ct: shards (the default: tar files of up to --shard-mb, a few per slide or "
                                 "series) or folder (one PNG per image)")
        parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_MB, help="he/ct: largest shard in MiB")
        parser.add_argument("--value-range", type=_pair, metavar="LOW:HIGH",
                            help="rgb/gray: scale images of more than 8 bits from this range (clipping outside it) "
                                 "instead of by the bits their values use")

    @classmethod
    def from_args(cls, modality: str, args: argparse.Namespace) -> IngestParams:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "modality" and hasattr(args, f.name)}
        for name in ("magnifications", "window", "thickness", "kernels", "labels", "windows", "value_range"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(modality=modality, **values)

    def argv(self) -> list[str]:
        """The options of ``python -m data.ingest`` that make this dataset (those that apply to its modality)."""
        args = []
        if self.modality == "he":
            args += ["--magnifications", *[f"{m:g}" for m in self.magnifications], "--tile-size", str(self.tile_size),
                     "--min-tissue", f"{self.min_tissue:g}"]
            args += ["--cases", self.cases] if self.cases else []
            args += ["--lenient-annotations"] if self.lenient_annotations else []
            args += ["--annotations", self.annotations] if self.annotations else []
            args += ["--workers", str(self.workers)] if self.workers else []
        elif self.modality == "ct":
            args += ["--window", *[f"{v:g}" for v in self.window], "--channels", self.channels]
            args += ["--windows=" + ",".join(f"{c:g}:{w:g}" for c, w in self.windows)] if self.windows else []
            args += ["--thickness", *[f"{v:g}" for v in self.thickness]] if self.thickness else []
            args += [a for kernel in self.kernels for a in ("--kernel", kernel)]
            args += [a for label in self.labels for a in ("--label", label)]
        elif self.value_range:
            # One token: argparse would take a negative LOW for an option.
            args += [f"--value-range={self.value_range[0]:g}:{self.value_range[1]:g}"]
        args += ["--layout", self.layout] if self.layout else []
        args += ["--shard-mb", str(self.shard_mb)] if self.sharded and self.shard_mb != DEFAULT_SHARD_MB else []
        return args + ["--val-fraction", f"{self.val_fraction:g}", "--seed", str(self.seed), "--on-error", self.on_error]

    def validate_argv(self) -> list[str]:
        """The options of ``python -m data.validate`` for the suite of this dataset."""
        if self.modality == "he":
            return ["--suite", "he_tiles", "--tile-size", str(self.tile_size),
                    "--magnifications", *[f"{m:g}" for m in self.magnifications], "--min-tissue", f"{self.min_tissue:g}"]
        if self.modality == "ct":
            return ["--suite", "ct_slices" if self.channels == "single" else "ct_slices_stacked"]
        return ["--suite", f"images_{self.modality}"]
