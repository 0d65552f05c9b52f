"""What pseudonymisation costs an ingest: the CT reader through the command (a view of links with
pseudonymous names, header identifiers replaced, the steward's mapping appended) against the same
reader on the raw folder as it is.

    .venv/bin/python benchmarks/pseudonyms.py [--series 40] [--slices 50] [--rounds 3]

The export is generated once: ``--series`` series of ``--slices`` 128 px slices (pydicom's
CT_small with its headers refilled), a folder per patient. Each variant ingests it into a fresh
folder as shards, in its own process; the variants alternate in rounds (the machine is shared and
drifts), every round is printed, then the median ratio of wall time and its range, and the time the
view alone takes to build.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export(root: Path, series: int, slices: int) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for s in range(series):
        folder = root / f"Patient_{s:04d}_MRN-{10000 + s}" / "CT"
        folder.mkdir(parents=True)
        uid = generate_uid()
        for i in range(slices):
            base.PatientID, base.PatientName = f"MRN-{10000 + s}", f"Patient^{s}"
            base.SeriesInstanceUID, base.SOPInstanceUID, base.InstanceNumber = uid, generate_uid(), i + 1
            base.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
            base.save_as(folder / f"IM{i:04d}")


def child(variant: str, raw: str, out: str) -> None:
    from data.ingest import ingest
    from data.params import IngestParams
    from data.readers.ct_series import ingest_ct

    start = time.perf_counter()
    if variant == "pseudonymised":
        ingest(IngestParams("ct", val_fraction=0.2), raw, out)
    else:
        ingest_ct(raw, out, val_fraction=0.2, shard_mb=1024)
    print(json.dumps({"s": time.perf_counter() - start}))


def view_seconds(raw: Path, work: Path) -> float:
    from data.privacy import Pseudonyms, clear_parts, pseudonymous_view

    names = Pseudonyms.load()
    start = time.perf_counter()
    with pseudonymous_view(raw, names, clear_parts("ct", (), raw), work / "view"):
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # A key and mapping of the benchmark's own: a site's mapping is not for made-up patients.
        from data.privacy import KEY_ENV, MAP_ENV, new_key

        os.environ[KEY_ENV], os.environ[MAP_ENV] = str(work / "site-key"), str(work / "pseudonyms.csv")
        new_key(work / "site-key")
        export(work / "raw", args.series, args.slices)
        print(f"{args.series} series x {args.slices} slices; view alone: {view_seconds(work / 'raw', work):.2f} s")
        times = {"as exported": [], "pseudonymised": []}
        for round_ in range(args.rounds):
            for variant in times:
                out = work / f"out-{round_}-{variant.replace(' ', '_')}"
                done = subprocess.run([sys.executable, __file__, "--child", variant, str(work / "raw"), str(out)],
                                      cwd=REPO, capture_output=True, text=True, check=True)
                times[variant].append(json.loads(done.stdout.strip().splitlines()[-1])["s"])
                print(f"round {round_ + 1}: {variant:14s} {times[variant][-1]:.2f} s", flush=True)
        ratios = [p / a for p, a in zip(times["pseudonymised"], times["as exported"])]
        print(f"pseudonymised / as exported: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
