"""Peak memory of whole-slide prediction against the number of tiles: it should stay flat, bounded by
the tile grid and a batch, not grow with the slide.

    python benchmarks/slide_memory.py --tiles 2500 10000 40000

Writes synthetic pyramidal tiled TIFFs (20x, 0.5 µm/px, H&E-coloured noise over the whole slide, so
every grid tile is tissue) with ``tifffile`` and predicts each with a tiny random ViT and heads
fitted on the demo's generated tiles (classification, segmentation, regression: every output is
written), each in its own process, and prints the peak RSS while it predicts (VmHWM, reset once
the model is loaded) against the RSS before, and the time per tile. The
model and the pixels do not matter here, only how memory grows.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILE = 32  # px at 20x: one grid tile per 32 level-0 pixels


def write_slide(path: Path, tiles: int, seed: int = 0) -> Path:
    import tifffile

    side = int(math.ceil(math.sqrt(tiles))) * TILE
    rng = np.random.default_rng(seed)
    block = (np.asarray([180, 90, 160], np.uint8) + rng.integers(0, 40, (1024, 1024, 3))).astype(np.uint8)
    base = np.tile(block, (side // 1024 + 1, side // 1024 + 1, 1))[:side, :side]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, scale = base, 1
        while True:
            # OpenSlide reads a generic tiled TIFF's levels from its IFDs, its mpp from the resolution.
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib", resolution=(1e4 / (0.5 * scale),) * 2,
                      resolutionunit="CENTIMETER")
            if max(level.shape[:2]) <= 1024:
                break
            level, scale = level[::2, ::2], scale * 2
    return path


def measure(slide: Path, model_dir: Path, out: Path) -> dict:
    """In this process (a fresh one per slide): predict and report peak RSS."""
    from clinical.slide import predict_slide
    from data.tiling import Tiling
    from dinomx.embed import Embedder
    from dinomx.inference import TilePredictor
    from dinomx.probes import TaskHeads

    predictor = TilePredictor(Embedder.from_pretrained(model_dir / "backbone"), TaskHeads.from_pretrained(model_dir / "heads"))
    before = _status("VmRSS")
    # The peak from here on (getrusage's would include the parent's, which a fork hands down).
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    summary = predict_slide(slide, predictor, Tiling("he", 20.0, 20.0, TILE, 0.5), out, batch_size=64)
    seconds = time.perf_counter() - start
    return {"tiles": summary["tiles"], "seconds": seconds, "rss_before_mib": before, "peak_rss_mib": _status("VmHWM")}


def _status(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def build_model(folder: Path) -> Path:
    from data.synthetic import generate
    from dinomx.backbone import Backbone
    from dinomx.config import DinoMXConfig
    from dinomx.embed import Embedder
    from dinomx.evaluation import evaluate

    data = generate(folder / "images", 0, 32, 24, 8, folder / "notes")
    cfg = DinoMXConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    Backbone.from_config(cfg.student).save_pretrained(folder / "backbone", cfg.dataset, 32)
    fitted = evaluate(Embedder.from_pretrained(folder / "backbone"), data, 5, folder / "notes" / "masks",
                      folder / "notes" / "targets.csv", "structure_fraction")
    fitted.heads.save_pretrained(folder / "heads")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[2500, 10000, 40000])
    parser.add_argument("--measure", nargs=3, metavar=("SLIDE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*map(Path, args.measure))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        for count in args.tiles:
            slide = write_slide(tmp / f"slide-{count}.tiff", count)
            done = subprocess.run([sys.executable, __file__, "--measure", str(slide), str(model), str(tmp / f"out-{count}")],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{row['tiles']:>7} tiles ({slide.stat().st_size / 2**20:.0f} MiB file): peak RSS {row['peak_rss_mib']:.0f} MiB "
                  f"(after loading the model {row['rss_before_mib']:.0f} MiB), {1000 * row['seconds'] / row['tiles']:.2f} ms "
                  "per tile", flush=True)


if __name__ == "__main__":
    main()
