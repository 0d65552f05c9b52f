"""What checking shards in worker processes costs when each worker imports Great Expectations
itself (spawned) against workers forked from a server that imported it once (``data.parallel``'s
``preload``). It asserts nothing.

    .venv/bin/python benchmarks/validation_workers.py --shards 8 --workers 2 --rounds 3

The shards are the demo generator's tiles packed small; each round checks every shard with the
real ``data.validate.check_shard`` through ``units_mapper``, the two ways alternated (A B A B ...),
timing from the pool's start to the last answer. Printed: each round, then the median ratio of
preloaded / spawned over the rounds and its range.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.parallel import units_mapper  # noqa: E402
from data.shards import SHARDS, pack_folder  # noqa: E402
from data.synthetic import generate  # noqa: E402
from data.validate import check_shard  # noqa: E402
from dinomx.shards import INDEX, read_index  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8, help="about how many shards")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tiles = generate(Path(tmp) / "tiles", seed=0, image_size=32, train_per_class=25 * args.shards, val_per_class=1)
        root = Path(tmp) / "dataset"
        pack_folder(tiles / "train", root / SHARDS / "train", max_bytes=(100 * 3 << 10))
        split = root / SHARDS / "train"
        tasks = [(str(split / shard.name), f"{SHARDS}/train/{shard.name}", shard.samples, "image_tiles_rgb",
                  {"tile_size": 32}) for shard in read_index(split).shards]
        assert (split / INDEX).is_file()
        print(f"{len(tasks)} shards of ~{tasks[0][2]} tiles, {args.workers} workers")
        times: dict[str, list[float]] = {"spawned": [], "preloaded": []}
        for round_ in range(args.rounds):
            for way, preload in (("spawned", ()), ("preloaded", ("data.validate",))):
                start = time.perf_counter()
                with units_mapper(args.workers, len(tasks), preload=preload) as mapper:
                    reports = list(mapper(check_shard, tasks))
                times[way].append(time.perf_counter() - start)
                assert all(r["success"] for r in reports), [r for r in reports if not r["success"]][:1]
                print(f"round {round_ + 1}: {way:<10}{times[way][-1]:>7.1f} s", flush=True)
    ratios = [p / s for p, s in zip(times["preloaded"], times["spawned"])]
    print(f"preloaded / spawned: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"medians {statistics.median(times['preloaded']):.1f} s against {statistics.median(times['spawned']):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
