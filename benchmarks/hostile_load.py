"""Peak worker memory and ``/livez`` latency of the BentoML service while hostile requests run.

    python benchmarks/hostile_load.py --name demo --alias production --clients 4 --seconds 30

Needs a registry with ``<name>-backbone@<alias>`` (``make demo`` makes one; MLFLOW_TRACKING_URI
points at it). It starts ``bentoml serve`` with the service's default limits and, from
``--clients`` threads, sends for ``--seconds``: requests at the pixel limit (4 solid 4096x4096
PNGs, 64 Mpx from ~1 MB of upload), requests over it (16 such images), a 50 MB JSON body, text in
the ``images`` field and a file under a wrong field name. Meanwhile it asks ``/livez`` every
100 ms. It prints the answers by status, the peak and final RSS of the service's processes and
the ``/livez`` latency percentiles, for each of ``--rounds``. It asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.demo import free_port, wait_ready  # noqa: E402


def solid_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 120, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_requests(base: str, big: bytes) -> list:
    return [
        lambda http: http.post(f"{base}/embed", files=[("images", (f"{i}.png", big, "image/png")) for i in range(4)]),
        lambda http: http.post(f"{base}/embed", files=[("images", (f"{i}.png", big, "image/png")) for i in range(16)]),
        lambda http: http.post(f"{base}/embed", content=b'{"images": [' + b'"x",' * (10 * 1024 * 1024) + b'"x"]}',
                               headers={"content-type": "application/json"}),
        lambda http: http.post(f"{base}/embed", data={"images": "http://127.0.0.1:9/x"},
                               files=[("images", ("a.png", big, "image/png"))]),
        lambda http: http.post(f"{base}/embed", files=[("image", ("a.png", big, "image/png"))]),
    ]


def rss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def attack(base: str, root: psutil.Process, requests: list, clients: int, seconds: float, idle: int) -> str:
    """One round: ``clients`` threads send ``requests`` in turn for ``seconds`` while ``/livez`` is timed."""
    statuses: Counter = Counter()
    livez: list[float] = []
    peak = idle
    deadline = time.monotonic() + seconds

    def send(index: int) -> None:
        with httpx.Client(timeout=300) as http:
            turn = index
            while time.monotonic() < deadline:
                try:
                    statuses[requests[turn % len(requests)](http).status_code] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                turn += 1

    def watch() -> None:
        nonlocal peak
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                http.get(f"{base}/livez")
                livez.append((time.perf_counter() - start) * 1000)
                peak = max(peak, rss(root))
                time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(clients)))
    watcher.join()
    time.sleep(2)
    cuts = statistics.quantiles(livez, n=100)
    return (f"{clients} clients, {seconds:g} s: answers {dict(sorted(statuses.items(), key=str))}\n"
            f"service RSS: idle {idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, after {rss(root) / 2**20:.0f} MiB\n"
            f"/livez over {len(livez)} checks: p50 {cuts[49]:.1f} ms, p99 {cuts[98]:.1f} ms, max {max(livez):.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--alias", default="production")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the attack: RSS after each round tells allocator retention from growth")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "VF_MODEL_NAME": args.name, "VF_MODEL_ALIAS": args.alias, "VF_RELOAD_INTERVAL_S": "0"}
    server = subprocess.Popen(["bentoml", "serve", "serving.service:VisionFoundry", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", server, timeout=180)
        root = psutil.Process(server.pid)
        idle = rss(root)
        requests = hostile_requests(base, solid_png(4096))
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}: {attack(base, root, requests, args.clients, args.seconds, idle)}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
