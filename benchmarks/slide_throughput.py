"""Whole-slide prediction throughput (tiles/s end to end: tiling, backbone, head, every output)
against the two things it could be compared with on the same tiles of the same slide:

- **tiling alone** (read and resize each tissue tile, nothing else): the bound, since a slide
  cannot be predicted faster than it is read;
- **the service's per-tile route** (``/classify`` with the same tiles, as PNG uploads of
  ``--per-request`` tiles, ``--clients`` at a time): what a user without whole-slide inference
  would do, timed with the client cutting and encoding the tiles (end to end, as predict is timed)
  and without (the requests alone).

    python benchmarks/slide_throughput.py --model models:/demo-head@production --slide .venv/testdata/cmu_small_region.svs

Needs a registry holding the head (``make demo`` makes one; MLFLOW_TRACKING_URI points at it). The
service runs with one worker and is started before the rounds. This machine is shared and drifts,
so the three variants alternate in rounds (tiling, slide, service, tiling, ...); each round is
printed, then the median of the per-round ratios with their range.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clinical.slide import predict_slide  # noqa: E402
from data.wsi import TilePlan, open_slide, tile_slide  # noqa: E402
from projects.predict import load_model  # noqa: E402
from scripts.demo import free_port, wait_ready  # noqa: E402


def tiling_alone(slide: Path, plan: TilePlan, magnification: float) -> int:
    handle, info = open_slide(slide)
    try:
        return sum(1 for _ in tile_slide(handle, info, plan, read=(magnification,)))
    finally:
        handle.close()


def tiles_as_png(slide: Path, plan: TilePlan, magnification: float) -> list[bytes]:
    """The tissue tiles as a client would send them to the per-tile route."""
    handle, info = open_slide(slide)
    out = []
    for tile in tile_slide(handle, info, plan, read=(magnification,)):
        buffer = io.BytesIO()
        tile.images[magnification].save(buffer, format="PNG")
        out.append(buffer.getvalue())
    handle.close()
    return out


def per_tile_route(base: str, tiles: list[bytes], per_request: int, clients: int) -> int:
    chunks = [tiles[i:i + per_request] for i in range(0, len(tiles), per_request)]

    def send(chunk: list[bytes]) -> None:
        with httpx.Client(timeout=300) as http:
            files = [("images", (f"t{i}.png", data, "image/png")) for i, data in enumerate(chunk)]
            http.post(f"{base}/classify", files=files).raise_for_status()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, chunks))
    return len(tiles)


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    count = fn()
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a registered head, e.g. models:/demo-head@production")
    parser.add_argument("--slide", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=16, help="tiles per /classify request")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alias", default="production", help="the service serves <family>@alias: the same head")
    args = parser.parse_args()
    model = load_model(args.model)
    if not args.model.endswith(f"@{args.alias}"):
        raise SystemExit(f"--model: give the head as models:/<family>-head@{args.alias}, the one the service serves")
    tiling, slide = model.tiling, Path(args.slide)
    plan = TilePlan(tiling.magnifications, tiling.tile_size, tiling.min_tissue)
    tiles = tiles_as_png(slide, plan, tiling.magnification)
    print(f"{slide.name}: {len(tiles)} tissue tiles of {tiling.tile_size} px at {tiling.magnification:g}x "
          f"({model.head_uri} on {model.backbone_uri})", flush=True)

    port = free_port()
    env = {**os.environ, "VF_MODEL_NAME": model.family, "VF_MODEL_ALIAS": args.alias, "VF_RELOAD_INTERVAL_S": "0",
           "VF_MAX_IMAGES": str(args.per_request)}
    server = subprocess.Popen(["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(f"{base}/readyz", server, timeout=180)
        per_tile_route(base, tiles[:args.per_request], args.per_request, 1)  # warm-up, not timed
        with tempfile.TemporaryDirectory() as scratch:
            for round_ in range(args.rounds):
                t_tiling, n = timed(lambda: tiling_alone(slide, plan, tiling.magnification))
                out = Path(scratch) / f"round{round_}"
                t_slide, _ = timed(lambda out=out: predict_slide(slide, model.predictor, tiling, out, args.batch_size)["tiles"])
                t_cut, cut = timed(lambda: tiles_as_png(slide, plan, tiling.magnification))
                t_route, _ = timed(lambda cut=cut: per_tile_route(base, cut, args.per_request, args.clients))
                row = {"tiling": n / t_tiling, "slide": n / t_slide, "route": n / (t_cut + t_route),
                       "requests": n / t_route}
                rows.append(row)
                print(f"round {round_ + 1}: tiling alone {row['tiling']:.1f} tiles/s, whole-slide predict "
                      f"{row['slide']:.1f} tiles/s, per-tile /classify {row['route']:.1f} tiles/s with the client's "
                      f"cutting ({row['requests']:.1f} for the requests alone)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def ratio(a: str, b: str) -> str:
        values = [r[a] / r[b] for r in rows]
        return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})"

    print(f"\nwhole-slide predict / per-tile route, the client cutting the tiles: {ratio('slide', 'route')}")
    print(f"whole-slide predict / per-tile route, requests alone:    {ratio('slide', 'requests')}")
    print(f"whole-slide predict / tiling alone:   {ratio('slide', 'tiling')} (the bound is 1.00x)")


if __name__ == "__main__":
    main()
