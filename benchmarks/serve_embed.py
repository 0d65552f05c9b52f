"""Requests/s and latency of ``/embed``: the BentoML service against ``mlflow models serve`` on the
same registered backbone, same machine, same client load.

    python benchmarks/serve_embed.py --name demo --alias production --clients 8 --requests 40

Needs a registry with ``<name>-backbone@<alias>`` (``make demo`` makes one; MLFLOW_TRACKING_URI
points at it). Each request carries one tile: BentoML gets it as a multipart PNG upload (decoded by
the service), MLflow as the pyfunc's JSON tensor input (N, H, W, C) uint8. Both servers run with
one worker process; the client threads run here, so the figures include client overhead equally.
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

    send(httpx.Client(timeout=120)).raise_for_status()  # warm-up, not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def serve(cmd: list[str], env: dict, ready: str) -> subprocess.Popen:
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(ready, server, timeout=300)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--alias", default="production")
    parser.add_argument("--image", default="", help="a tile (default: the first demo val tile)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="per client")
    args = parser.parse_args()
    image = Path(args.image or sorted(Path("data/demo/images/val/glands").glob("*.png"))[0])
    png = image.read_bytes()
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[None]
    body = json.dumps({"inputs": array.tolist()})
    env = {**os.environ, "VF_MODEL_NAME": args.name, "VF_MODEL_ALIAS": args.alias, "VF_RELOAD_INTERVAL_S": "0"}
    results = {}

    port = free_port()
    server = serve(["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1", "--port", str(port)],
                   env, f"http://127.0.0.1:{port}/readyz")
    try:
        results["bentoml /embed"] = drive(
            lambda http: http.post(f"http://127.0.0.1:{port}/embed", files={"images": (image.name, png, "image/png")}),
            args.clients, args.requests)
    finally:
        server.terminate()
        server.wait(30)

    port = free_port()
    model = f"models:/{args.name}-backbone@{args.alias}"
    server = serve(["mlflow", "models", "serve", "-m", model, "--env-manager", "local", "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1"], env, f"http://127.0.0.1:{port}/ping")
    try:
        results["mlflow /invocations"] = drive(
            lambda http: http.post(f"http://127.0.0.1:{port}/invocations", content=body,
                                   headers={"Content-Type": "application/json"}),
            args.clients, args.requests)
    finally:
        server.terminate()
        server.wait(30)

    print(f"{model}, {image.name} {array.shape[2]}x{array.shape[1]}, {args.clients} clients x {args.requests} requests")
    print(f"{'server':<22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in results.items():
        print(f"{name:<22}{r['req_per_s']:>8.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
