"""Data at scale: one file per tile against shards, from writing to a training epoch's read.

    .venv/bin/python benchmarks/data_scale.py [--sizes 1000 10000 50000] [--rounds 2] [--shard-mb 64]

For each size N, N generated 64-px RGB tiles (two classes, textured so PNG does not flatter them)
go through every step a dataset takes, in its own process (wall time and that process's peak
memory), once as an image folder (``files``) and once as shards (``shards``), alternating in rounds:

- ``write``: the tiles as PNG files, or packed into shards (``python -m data.shards``);
- ``dvc add``, ``dvc push`` (to a local remote) and ``dvc status`` of the dataset;
- ``validate``: ``data.validate`` with the ``image_tiles_rgb`` suite (shards: each by itself,
  two at a time);
- ``read``: one epoch decoded as training reads it (``ImageFolderDataset`` / ``dinomx.stream``);
- ``add 1k``: 1,000 more tiles (one new slide's worth), then ``dvc add`` and ``validate`` again.

Prints a row per step and variant with seconds, microseconds per tile and peak MiB, the median
ratio shards/files over rounds, and a linear extrapolation to 10M tiles from the two largest sizes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEN_MILLION = 10_000_000
ADDED = 1000


def generate(root: Path, count: int, start: int = 0) -> None:
    """``root/<class>/<n>.png``: smooth noise of two textures, 64 px."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(start)
    for n in range(start, start + count):
        label = "coarse" if n % 2 else "fine"
        cells = 8 if label == "coarse" else 32
        noise = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((64, 64), Image.Resampling.BILINEAR)
        (root / label).mkdir(parents=True, exist_ok=True)
        image.save(root / label / f"t{n:08d}.png")


def read_epoch(data: str) -> None:
    """Decode every tile once, as the trainer's loaders do."""
    from dinomx.data import ImageFolderDataset
    from dinomx.images import to_model_mode
    from dinomx.shards import decode, is_sharded, read_index
    from dinomx.stream import Reader, ShardOrder

    if is_sharded(data):
        index = read_index(data)
        order = ShardOrder(index, seed=0, open_shards=4, buffer=1000)
        for n, sample in enumerate(order(Reader(0, 1), 0)):
            to_model_mode(decode(sample.parts[index.image], f"{sample.shard}: sample {sample.key}"), 3)
            if n + 1 == index.samples:
                break
    else:
        images = ImageFolderDataset(data)
        for i in range(len(images)):
            images[i]


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak MiB) of one command in its own process."""
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - began
    if status:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def python(*code: str) -> list[str]:
    return [sys.executable, "-c", "\n".join(["import sys", f"sys.path.insert(0, {str(REPO)!r})", *code])]


def one_round(variant: str, size: int, shard_mb: int, tiles: Path, work: Path) -> dict[str, tuple[float, float]]:
    repo = work / variant
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "remote", "add", "-q", "-d", "store", str(work / f"{variant}-remote")], cwd=repo, check=True)
    shutil.rmtree(work / f"{variant}-remote", ignore_errors=True)
    data = repo / "data" / "ds"
    validate = [sys.executable, "-m", "data.validate", "--dataset", str(data), "--report-dir", str(work / f"{variant}-report"),
                "--suite", "image_tiles_rgb", "--tile-size", "64", "--context-root", str(work / f"{variant}-gx")]
    shutil.rmtree(work / f"{variant}-gx", ignore_errors=True)
    if variant == "files":
        write = [sys.executable, "-c", f"import shutil; shutil.copytree({str(tiles)!r}, {str(data / 'train')!r})"]
        split = data / "train"
    else:
        write = [sys.executable, "-m", "data.shards", str(tiles), "--out", str(data / "shards" / "train"),
                 "--shard-mb", str(shard_mb)]
        split = data / "shards" / "train"
    steps = {"write": timed(write, repo)}
    steps["dvc add"] = timed([*dvc, "add", "-q", "data/ds"], repo)
    steps["dvc push"] = timed([*dvc, "push", "-q"], repo)
    steps["dvc status"] = timed([*dvc, "status", "-q"], repo)
    steps["validate"] = timed(validate, repo)
    steps["read"] = timed(python("from benchmarks.data_scale import read_epoch", f"read_epoch({str(split)!r})"), repo)
    # One more slide's worth of tiles: the files go in beside the others; as shards, one new shard.
    extra = work / "extra"
    if variant == "files":
        add = python("from benchmarks.data_scale import generate", "from pathlib import Path",
                     f"generate(Path({str(split)!r}), {ADDED}, start={size})")
    else:
        add = python("from pathlib import Path", "from benchmarks.data_scale import generate",
                     "from data.shards import pack_folder", "from dinomx.shards import read_index, INDEX",
                     f"extra = Path({str(extra)!r})", f"generate(extra / 'train', {ADDED}, start={size})",
                     "new = pack_folder(extra / 'train', extra / 'packed', split='train')",
                     f"split = Path({str(split)!r}); index = read_index(split)",
                     "shard = new.shards[0].__class__(**{**new.shards[0].__dict__, 'name': 'added-00000.tar'})",
                     "(extra / 'packed' / new.shards[0].name).rename(split / shard.name)",
                     "index.shards.append(shard); index.root = '.'; (split / INDEX).write_text(index.to_json())")
    shutil.rmtree(extra, ignore_errors=True)
    began = time.perf_counter()
    timed(add, repo)
    added_add, mem_add = timed([*dvc, "add", "-q", "data/ds"], repo)
    added_validate, mem_validate = timed(validate, repo)
    steps["add 1k: dvc add"] = (added_add, mem_add)
    steps["add 1k: validate"] = (added_validate, mem_validate)
    steps["add 1k: total"] = (time.perf_counter() - began, max(mem_add, mem_validate))
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(work / f"{variant}-remote", ignore_errors=True)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shard-mb", type=int, default=64, help="largest shard (the product's default is 1024)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vf-data-scale-"))
    results: dict[int, dict[str, dict[str, list[tuple[float, float]]]]] = {}
    try:
        for size in args.sizes:
            tiles = work / f"tiles-{size}" / "train"
            generate(tiles, size)
            results[size] = {"files": {}, "shards": {}}
            for round_ in range(args.rounds):
                order = ("files", "shards") if round_ % 2 == 0 else ("shards", "files")
                for variant in order:
                    for step, figures in one_round(variant, size, args.shard_mb, tiles, work).items():
                        results[size][variant].setdefault(step, []).append(figures)
                print(f"N={size:,} round {round_ + 1}: " + ", ".join(
                    f"{v} {results[size][v]['dvc add'][-1][0]:.1f}s dvc add" for v in ("files", "shards")), flush=True)
            shutil.rmtree(tiles.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.rounds)


def report(results: dict, rounds: int) -> None:
    sizes = sorted(results)
    steps = list(results[sizes[0]]["files"])
    print(f"\nMedian of {rounds} alternated round(s); seconds, microseconds per tile, peak MiB of the step's process; "
          "ratio = shards / files (seconds)\n")
    print(f"{'N':>8}  {'step':<18} {'files s':>9} {'us/tile':>8} {'MiB':>6}  {'shards s':>9} {'us/tile':>8} {'MiB':>6}  "
          f"{'ratio':>6} {'(range)':>13}")
    for size in sizes:
        for step in steps:
            row = []
            for variant in ("files", "shards"):
                runs = results[size][variant][step]
                seconds = statistics.median(s for s, _ in runs)
                per_tile = seconds / (ADDED if step.startswith("add") else size) * 1e6
                row.append((seconds, per_tile, max(m for _, m in runs)))
            ratios = [s / f for (s, _), (f, _) in zip(results[size]["shards"][step], results[size]["files"][step])]
            spread = f"({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            print(f"{size:>8,}  {step:<18} {row[0][0]:>9.2f} {row[0][1]:>8.0f} {row[0][2]:>6.0f}  "
                  f"{row[1][0]:>9.2f} {row[1][1]:>8.0f} {row[1][2]:>6.0f}  {statistics.median(ratios):>6.2f} {spread:>13}")
        print()
    if len(sizes) < 2:
        return
    small, large = sizes[-2], sizes[-1]
    print(f"Linear extrapolation to 10M tiles (from N={small:,} and N={large:,}): seconds and peak GiB")
    for step in steps:
        line = f"  {step:<18}"
        for variant in ("files", "shards"):
            a = [statistics.median(s for s, _ in results[n][variant][step]) for n in (small, large)]
            m = [max(x for _, x in results[n][variant][step]) for n in (small, large)]
            # What grows with N grows at the slope between the two sizes; the rest is fixed cost.
            # For "add 1k" N is the size of the dataset the thousand tiles join.
            seconds = a[1] + max(0.0, (a[1] - a[0]) / (large - small)) * (TEN_MILLION - large)
            memory = m[1] + max(0.0, (m[1] - m[0]) / (large - small)) * (TEN_MILLION - large)
            line += f"  {variant} {seconds / 60:>8.1f} min {memory / 1024:>6.1f} GiB"
        print(line)


if __name__ == "__main__":
    main()
