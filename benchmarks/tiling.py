"""Slide tiling: CPU per tile against a plain OpenSlide loop, and wall time against workers.

    .venv/bin/python benchmarks/tiling.py [--slide S.svs] [--copies 4] [--rounds 3] [--tile-size 224]

One magnification, the real CMU slide region the tests use (``make test`` fetches it). Variants
run in their own processes, alternating in rounds (the machine is shared and drifts):

- ``ingest``: ``data.ingest`` on ``--copies`` copies of the slide, one worker;
- ``plain``: for each copy, read every grid tile with ``read_region``, keep it if its mean
  saturation is above the tissue threshold, encode it as PNG: the floor any tiler pays;
- ``ingest, N workers``: the same ingestion with one process per core.

CPU per tile is the processes' user + system time divided by the tiles written; its ratio to the
plain loop is the overhead of manifests, masks, stain statistics and staging. Each round is
printed, then the median ratios and their ranges.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(args) -> None:
    sys.path.insert(0, str(REPO))
    raw, out = Path(args.raw), Path(args.out)
    began, cpu = time.perf_counter(), _cpu()
    if args.variant == "plain":
        tiles = plain(raw, out, args.tile_size)
    else:
        from data.readers.slides import ingest_he
        from data.wsi import TilePlan

        plan = TilePlan(magnifications=(20,), tile_size=args.tile_size, min_tissue=0.5)
        tiles = len(ingest_he(raw, out, plan, val_fraction=0.0, workers=args.workers))
    print(json.dumps({"tiles": tiles, "cpu_s": _cpu() - cpu, "wall_s": time.perf_counter() - began}))


def plain(raw: Path, out: Path, size: int) -> int:
    import numpy as np
    import openslide

    out.mkdir(parents=True)
    written = 0
    for path in sorted(raw.glob("*.svs")):
        with openslide.OpenSlide(str(path)) as slide:
            width, height = slide.dimensions
            for y in range(0, height - size + 1, size):
                for x in range(0, width - size + 1, size):
                    tile = slide.read_region((x, y), 0, (size, size)).convert("RGB")
                    saturation = np.asarray(tile.convert("HSV"))[..., 1]
                    if (saturation > 20).mean() < 0.5:
                        continue
                    buffer = io.BytesIO()
                    tile.save(buffer, format="PNG")
                    (out / f"{path.stem}_{x}_{y}.png").write_bytes(buffer.getvalue())
                    written += 1
    return written


def _run(variant: str, raw: Path, out: Path, tile_size: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--child", variant, "--raw", str(raw), "--out", str(out),
                             "--tile-size", str(tile_size), "--workers", str(workers)],
                            capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(Path(sys.prefix) / "testdata" / "cmu_small_region.svs"))
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return
    cores = os.cpu_count() or 1
    variants = {"ingest, 1 worker": ("ingest", 1), "plain loop": ("plain", 1), f"ingest, {cores} workers": ("ingest", cores)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        for index in range(args.copies):
            shutil.copy(args.slide, raw / f"slide{index}.svs")
        print(f"{args.copies} copies of {Path(args.slide).name}, {args.tile_size} px tiles at 20x, {cores} cores")
        for round_ in range(args.rounds):
            for name, (variant, workers) in variants.items():
                figures = _run(variant, raw, Path(tmp) / "out", args.tile_size, workers)
                runs[name].append(figures)
                print(f"round {round_ + 1}: {name:<18}{figures['tiles']:>6} tiles  {1000 * figures['cpu_s'] / figures['tiles']:>7.2f} "
                      f"ms CPU/tile  {figures['wall_s']:>6.2f} s wall")
    one, base, many = (runs[name] for name in variants)
    print()
    print(f"CPU per tile, ingest / plain loop:       {_spread([a['cpu_s'] / a['tiles'] / (b['cpu_s'] / b['tiles']) for a, b in zip(one, base)])}")
    print(f"wall time, {cores} workers / 1 worker:      {_spread([m['wall_s'] / a['wall_s'] for a, m in zip(one, many)])}")


if __name__ == "__main__":
    main()
