"""Requests/s, latency and start-up of ``/embed``: the BentoML service against ``mlflow models
serve`` on the same registered backbone, same machine, same client load.

    python benchmarks/serve_embed.py --name demo --alias production --clients 8 --requests 40 --rounds 5
    python benchmarks/serve_embed.py --against unwatched    # the drift watch's cost: the service with VF_WATCH=off

Needs a registry with ``<name>-backbone@<alias>`` (``make demo`` makes one; MLFLOW_TRACKING_URI
points at it). Each request carries ``--images`` tiles: BentoML gets them as multipart PNG uploads
(decoded by the service), MLflow as the pyfunc's JSON tensor input (N, H, W, C) uint8. Both servers
run with one worker process; the client threads run here, so the figures include client overhead
equally.

This machine is shared and drifts, so the variants alternate: start-ups B M B M ..., then both
servers stay up and the load rounds alternate B M B M ... Each round is printed; the summary is the
median of the per-round ratios, with their range, which says how noisy the run was.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.demo import free_port, wait_ready  # noqa: E402


def drive(send, clients: int, requests: int) -> dict:
    latencies = []

    def worker(_):
        with httpx.Client(timeout=120) as http:
            for _ in range(requests):
                start = time.perf_counter()
                response = send(http)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

    with httpx.Client(timeout=120) as http:
        send(http).raise_for_status()  # warm-up, not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


class Server:
    """One of the two servers: how to start it, where it is ready, how to send it a request."""

    def __init__(self, label: str, command, ready: str, send, env: dict | None = None):
        self.label, self.command, self.ready, self.send, self.env = label, command, ready, send, env or {}
        self.port = 0
        self.process: subprocess.Popen | None = None

    def start(self, env: dict) -> float:
        """Seconds from launch to ready."""
        self.port = free_port()
        began = time.perf_counter()
        self.process = subprocess.Popen(self.command(self.port), env={**env, **self.env}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_ready(self.ready.format(port=self.port), self.process, timeout=300)
        return time.perf_counter() - began

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def servers(args, png: bytes, name: str, body: str) -> list[Server]:
    model = f"models:/{args.name}-backbone@{args.alias}"
    files = [("images", (name, png, "image/png"))] * args.images

    def bento(label: str, env: dict | None = None) -> Server:
        return Server(label, lambda port: ["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1",
                                           "--port", str(port)],
                      "http://127.0.0.1:{port}/readyz",
                      lambda server, http: http.post(f"http://127.0.0.1:{server.port}/embed", files=files), env)

    if args.against == "unwatched":
        return [bento("bentoml /embed watched"), bento("bentoml /embed unwatched", {"VF_WATCH": "off"})]
    return [
        bento("bentoml /embed"),
        Server("mlflow /invocations",
               lambda port: ["mlflow", "models", "serve", "-m", model, "--env-manager", "local", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
               "http://127.0.0.1:{port}/ping",
               lambda server, http: http.post(f"http://127.0.0.1:{server.port}/invocations", content=body,
                                              headers={"Content-Type": "application/json"})),
    ]


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} (range {min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--alias", default="production")
    parser.add_argument("--image", default="", help="a tile (default: the first demo val tile)")
    parser.add_argument("--images", type=int, default=1, help="tiles per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="per client and round")
    parser.add_argument("--rounds", type=int, default=5, help="load rounds per server, alternated")
    parser.add_argument("--startups", type=int, default=3, help="start-ups per server, alternated")
    parser.add_argument("--against", default="mlflow", choices=("mlflow", "unwatched"),
                        help="the second server: `mlflow models serve`, or this service with its drift watch off")
    args = parser.parse_args()
    image = Path(args.image or sorted(Path("data/demo/images/val/glands").glob("*.png"))[0])
    png = image.read_bytes()
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[None].repeat(args.images, axis=0)
    body = json.dumps({"inputs": array.tolist()})
    env = {**os.environ, "VF_MODEL_NAME": args.name, "VF_MODEL_ALIAS": args.alias, "VF_RELOAD_INTERVAL_S": "0"}
    first, second = both = servers(args, png, image.name, body)

    print(f"models:/{args.name}-backbone@{args.alias}, {image.name} {array.shape[2]}x{array.shape[1]}, "
          f"{args.images} image(s) per request, {args.clients} clients x {args.requests} requests per round")
    startups: dict[str, list[float]] = {s.label: [] for s in both}
    for round_ in range(args.startups):
        for server in both:
            seconds = server.start(env)
            server.stop()
            startups[server.label].append(seconds)
            print(f"start-up {round_ + 1}: {server.label:<22}{seconds:>7.1f} s")

    rounds: dict[str, list[dict]] = {s.label: [] for s in both}
    for server in both:
        server.start(env)
    try:
        for round_ in range(args.rounds):
            for server in both:
                figures = drive(lambda http, server=server: server.send(server, http), args.clients, args.requests)
                rounds[server.label].append(figures)
                print(f"round {round_ + 1}: {server.label:<22}{figures['req_per_s']:>8.1f} req/s  "
                      f"p50 {figures['p50_ms']:>6.1f} ms  p99 {figures['p99_ms']:>6.1f} ms")
    finally:
        for server in both:
            server.stop()

    ours, theirs = rounds[first.label], rounds[second.label]
    print()
    print(f"{'server':<22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'start s':>9}   (medians over rounds)")
    for server in both:
        r = rounds[server.label]
        print(f"{server.label:<22}{statistics.median(x['req_per_s'] for x in r):>8.1f}"
              f"{statistics.median(x['p50_ms'] for x in r):>9.1f}{statistics.median(x['p99_ms'] for x in r):>9.1f}"
              f"{statistics.median(startups[server.label]):>9.1f}")
    ratio = f"{first.label} / {second.label}"
    print(f"req/s ratio per round, {ratio}: {_spread([a['req_per_s'] / b['req_per_s'] for a, b in zip(ours, theirs)])}")
    print(f"p99 ratio per round, {ratio}:   {_spread([a['p99_ms'] / b['p99_ms'] for a, b in zip(ours, theirs)])}")
    print(f"start-up ratio, {ratio}:        "
          f"{_spread([a / b for a, b in zip(startups[first.label], startups[second.label])])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
