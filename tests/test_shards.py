"""Sharded tile datasets: written by ingestion (a real slide, pydicom's CT), checked shard by shard,
streamed into training with exact resume, from a folder, worker processes and a real S3 server."""
import hashlib
import io
import itertools
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.listing import split_of
from data.readers.slides import ingest_he
from data.shards import ShardWriter, pack_folder, png_bytes
from data.validate import validate_dataset
from data.wsi import TilePlan
from dinomx.checkpoint import CHECKPOINT_NAME
from dinomx.config import ConfigError
from dinomx.data import labelled_images
from dinomx.errors import DataError, MissingInput
from dinomx.shards import INDEX, ShardDamaged, ShardSet, read_index, read_shard
from dinomx.stream import Reader, ShardOrder, ShardStream
from dinomx.train import train
from tests.conftest import BUCKET, tiny_config

PLAN = TilePlan(magnifications=(20, 10), tile_size=64, min_tissue=0.5)
SHARD = 1 << 20  # 1 MiB: a slide of 64-px tiles makes a dozen shards


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[Path, dict[str, str], int]:
    """Four copies of the real slide, one per case, with a cases CSV, and a split seed that puts
    cases in both train and val."""
    path = Path(os.environ.get("VF_TEST_SLIDE", Path(sys.prefix) / "testdata" / "cmu_small_region.svs"))
    raw = tmp_path_factory.mktemp("slides") / "raw"
    cases = {}
    for n in range(4):
        (raw / f"batch{n % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, raw / f"batch{n % 2}" / f"s{n}.svs")
        cases[f"batch{n % 2}/s{n}.svs"] = f"patient-{n}"
    csv = raw.parent / "cases.csv"
    pd.DataFrame({"slide": list(cases), "case": list(cases.values())}).to_csv(csv, index=False)
    seed = next(s for s in range(100) if {split_of(c, 0.5, s) for c in cases.values()} == {"train", "val"})
    return raw, cases, seed


def _samples(split_root: Path) -> dict[str, dict[str, bytes]]:
    index = read_index(split_root)
    return {key: parts for shard in index.shards for key, parts in read_shard(split_root / shard.name)}


def test_sharded_tiles_are_the_folder_tiles_pixel_for_pixel_split_by_case(slides, tmp_path):
    raw, cases, seed = slides
    csv = raw.parent / "cases.csv"
    folder = ingest_he(raw, tmp_path / "folder", PLAN, val_fraction=0.5, seed=seed, cases=csv, workers=2)
    sharded = ingest_he(raw, tmp_path / "sharded", PLAN, val_fraction=0.5, seed=seed, cases=csv, workers=2,
                        shard_mb=1)
    assert not (tmp_path / "sharded" / "manifest.csv").exists() and len(sharded) > 4  # several shards per slide
    summary = json.loads((tmp_path / "sharded" / "ingest.json").read_text())
    assert summary["images"] == len(folder) and summary["shards"] == len(sharded) and summary["used"] == 4

    places = {(r["source"], r["x"], r["y"], r["magnification"]): r for r in folder.to_dict("records")}
    compared = 0
    for split in ("train", "val"):
        root = tmp_path / "sharded" / "shards" / split
        index = read_index(root)
        assert index.image == "20x.png" and index.components == ["20x.png", "10x.png"]
        for shard in index.shards:
            assert shard.bytes <= SHARD + 200_000 and shard.bytes == (root / shard.name).stat().st_size
            rows = [json.loads(parts["json"]) for _, parts in read_shard(root / shard.name)]
            # One slide, one case and one split per shard; every tile keeps its place and its case.
            assert {r["20x.png"]["source"] for r in rows} == {shard.source}
            assert {r["20x.png"]["case"] for r in rows} == {cases[shard.source]}
            assert {r[c]["split"] for r in rows for c in ("20x.png", "10x.png")} == {split}
            assert len(rows) == shard.samples
        for parts in _samples(root).values():
            for component in ("20x.png", "10x.png"):
                row = json.loads(parts["json"])[component]
                expected = places.pop((row["source"], row["x"], row["y"], row["magnification"]))
                assert row == {k: v for k, v in expected.items() if k != "path"} and expected["split"] == split
                pixels = np.asarray(Image.open(io.BytesIO(parts[component])))
                assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "folder" / expected["path"])))
                compared += 1
    assert compared == len(folder) and not places
    train_cases = {cases[s.source] for s in read_index(tmp_path / "sharded/shards/train").shards}
    val_cases = {cases[s.source] for s in read_index(tmp_path / "sharded/shards/val").shards}
    assert train_cases and val_cases and not train_cases & val_cases


def test_adding_a_slide_tiles_and_checks_only_that_slide(slides, tmp_path):
    raw, cases, seed = slides
    mine = tmp_path / "raw"
    shutil.copytree(raw, mine, ignore=shutil.ignore_patterns("s3.svs"))
    out, context = tmp_path / "tiles", tmp_path / "context"
    params = {"tile_size": 64, "magnifications": [20, 10], "min_tissue": 0.5}
    ingest_he(mine, out, PLAN, val_fraction=0.0, workers=1, shard_mb=1)
    first, _ = validate_dataset(out, "he_tiles", params, context, workers=2)
    assert first.success and first.shards["checked"] == first.shards["shards"] > 6 and first.data_docs is None
    before = {p.name: p.stat().st_ino for p in (out / "shards/train").glob("*.tar")}

    again, _ = validate_dataset(out, "he_tiles", params, context)
    assert again.shards == {"shards": first.shards["shards"], "checked": 0, "cached": first.shards["shards"], "hashed": 0}
    assert again.rows == first.rows

    # Bit rot that keeps size and modification time: unseen while the remembered md5 is trusted,
    # found by --verify, and by the next validation once the md5 is older than its trust period.
    rotten = sorted((out / "shards/train").glob("*.tar"))[0]
    pristine = rotten.read_bytes()
    _rot(rotten)
    assert validate_dataset(out, "he_tiles", params, context)[0].success
    for how in ("verify", "a week later"):
        if how == "a week later":
            memo = context / "gx/uncommitted/shards/md5.json"
            memo.write_text(json.dumps({k: [md5, at - 8 * 86400] for k, (md5, at) in json.loads(memo.read_text()).items()}))
        rot, _ = validate_dataset(out, "he_tiles", params, context, verify=how == "verify")
        [failure] = [f for f in rot.failures if f.expectation == "shard_matches_its_index"]
        assert not rot.success and failure.files == [f"shards/train/{rotten.name}"] and rot.shards["hashed"] > 0, how
    stat = rotten.stat()
    rotten.write_bytes(pristine)
    os.utime(rotten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert validate_dataset(out, "he_tiles", params, context, verify=True)[0].success

    shutil.copy(raw / "batch1" / "s3.svs", mine / "batch1" / "s3.svs")
    ingest_he(mine, out, PLAN, val_fraction=0.0, workers=1, shard_mb=1)
    after = {p.name: p.stat().st_ino for p in (out / "shards/train").glob("*.tar")}
    new = set(after) - set(before)
    # The three slides that did not change keep their shard files (same inode: nothing rewritten).
    assert {name: after[name] for name in before} == before and new and all(n.startswith("batch1__s3") for n in new)
    grown, _ = validate_dataset(out, "he_tiles", params, context)
    assert grown.success and grown.shards["checked"] == len(new) and grown.shards["cached"] == len(before)

    # A shard whose bytes changed is checked again, and its bad tile is named inside it.
    victim = sorted(before)[0]
    path = out / "shards/train" / victim
    samples = list(read_shard(path))
    writer = ShardWriter(tmp_path / "rewritten", "shard", 1 << 30)
    for n, (key, parts) in enumerate(samples):
        if n == 2:
            parts = {**parts, "20x.png": png_bytes(Image.new("RGB", (64, 64), (255, 255, 255)))}
        writer.add(key, parts)
    writer.close()
    os.replace(tmp_path / "rewritten" / "shard-00000.tar", path)
    broken, _ = validate_dataset(out, "he_tiles", params, context)
    assert not broken.success and broken.shards["checked"] == 1
    named = {f for failure in broken.failures for f in failure.files}
    assert f"shards/train/{victim}:{samples[2][0]}.20x.png" in named and f"shards/train/{victim}" in named
    assert all(f.startswith(f"shards/train/{victim}") for f in named)


def _synthetic_shards(root: Path, sizes: list[int], side: int = 8) -> ShardSet:
    """Shards of tiny images whose first pixel is their number, two classes."""
    shards, number = [], 0
    for j, size in enumerate(sizes):
        writer = ShardWriter(root, f"part{j}", 1 << 30)
        for _ in range(size):
            label = "even" if number % 2 == 0 else "odd"
            pixels = np.full((side, side, 3), number % 256, np.uint8)
            pixels[0, 0, 1] = number // 256
            writer.add(f"s{number:05d}", {"png": png_bytes(Image.fromarray(pixels)),
                                          "json": json.dumps({"png": {"label": label}}).encode()}, label)
            number += 1
        shards += writer.close()
    index = ShardSet(str(root), shards, ["even", "odd"], "png", ["png"])
    (root / INDEX).write_text(index.to_json())
    return index


def _number(parts: dict[str, bytes]) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(parts["png"])))
    return int(pixels[0, 0, 0]) + 256 * int(pixels[0, 0, 1])


@pytest.mark.parametrize("readers", [2, 9])  # shards dealt to readers; fewer shards than readers
def test_a_stream_continues_exactly_from_any_position_and_readers_share_nothing(tmp_path, readers):
    index = _synthetic_shards(tmp_path, [7, 5, 9, 6, 8])
    order = ShardOrder(index, seed=3, open_shards=2, buffer=4)
    epoch = sum(s.samples for s in index.shards)
    streams = [[_number(p.parts) for p in itertools.islice(order(Reader(r, readers), 0), 3 * epoch)] for r in range(readers)]
    firsts = []
    for r, stream in enumerate(streams):
        per_epoch = sum(order.group_size(Reader(r, readers), g, d) for groups, d in [order.groups(Reader(r, readers), 0)]
                        for g in groups)
        firsts += stream[:per_epoch]
        # From any start, mid-shard and mid-group included, the same samples follow.
        for start in (1, 3, 5, 11, per_epoch - 1, per_epoch + 2):
            assert [_number(p.parts) for p in itertools.islice(order(Reader(r, readers), start), 8)] == stream[start:start + 8]
    # The first epoch of all readers together: every sample once.
    assert sorted(firsts) == list(range(epoch))
    assert streams[0][:epoch] != sorted(streams[0][:epoch])  # shuffled


def test_a_read_that_breaks_off_goes_on_where_it_stopped(tmp_path, caplog):
    index = _synthetic_shards(tmp_path, [6, 6, 6])
    clean = ShardOrder(index, seed=1, open_shards=2, buffer=3)
    broken = set()

    def flaky(url, md5=None):  # each shard's first read drops the connection after its third sample
        for n, sample in enumerate(read_shard(url, md5)):
            if n == 3 and url not in broken:
                broken.add(url)
                raise ConnectionResetError("connection reset by peer")
            yield sample

    retried = ShardOrder(index, seed=1, open_shards=2, buffer=3, read=flaky, wait_s=0.0)
    assert [_number(p.parts) for p in itertools.islice(retried(Reader(0, 1), 0), 18)] == [
        _number(p.parts) for p in itertools.islice(clean(Reader(0, 1), 0), 18)]
    assert len(broken) == 3 and "read failed after 3 sample(s) (connection reset by peer); trying again" in caplog.text

    def dead(url, md5=None):
        raise ConnectionRefusedError("no route to the store")
        yield

    with pytest.raises(ConnectionRefusedError):
        list(itertools.islice(ShardOrder(index, 1, 2, 3, read=dead, retries=2, wait_s=0.0)(Reader(0, 1), 0), 1))


def _ids(img, position):
    return torch.tensor([_number({"png": png_bytes(img)})])


def test_worker_processes_of_two_ranks_read_disjoint_samples_and_resume_where_they_were(tmp_path):
    index = _synthetic_shards(tmp_path, [10, 10, 10, 10, 10, 10, 10, 10])
    order = ShardOrder(index, seed=0, open_shards=2, buffer=8)

    def batches(rank: int, start: int, end: int) -> list[list[int]]:
        stream = ShardStream(order, _ids, 3, batch_size=2, start=start, end=end, rank=rank, world=2)
        # Forked workers, as training's DataLoader starts them on Linux; the stream also pickles,
        # as a spawned worker (macOS, Windows) would need.
        assert pickle.loads(pickle.dumps(stream)).order.shards == order.shards
        loader = DataLoader(stream, batch_size=2, num_workers=2)
        return [batch.flatten().tolist() for batch in loader]

    ranks = [batches(rank, 0, 20) for rank in (0, 1)]
    seen = [n for rank in ranks for batch in rank for n in batch]
    assert len(seen) == 80 == len(set(seen))  # 2 ranks x 20 steps x 2: one epoch, nothing read twice
    assert batches(1, 7, 20) == ranks[1][7:]


def test_training_from_shards_resumes_exactly_and_refuses_what_shards_lack(tiles, tmp_path):
    shards = tmp_path / "shards"
    pack_folder(tiles / "train", shards / "train", max_bytes=8 << 10)
    pack_folder(tiles / "val", shards / "val", max_bytes=8 << 10)
    assert len(read_index(shards / "train").shards) > 3
    sections = dict(dataset={"num_workers": 2, "open_shards": 2, "shuffle_buffer": 16})
    straight = []
    cfg = tiny_config(train={"output_dir": str(tmp_path / "a"), "log_every": 1, "eval_every": 3}, **sections)
    result = train(cfg, shards / "train", on_log=lambda s, m: straight.append((s, m.get("total_loss"), m.get("knn_top1"))),
                   eval_root=shards / "val")
    assert result.metrics["knn_top1"] > 0

    class Killed(Exception):
        pass

    def die_at_4(step, metrics):
        if step == 4:
            raise Killed

    cfg = tiny_config(train={"output_dir": str(tmp_path / "b"), "log_every": 1, "checkpoint_every": 2, "eval_every": 3},
                      **sections)
    with pytest.raises(Killed):
        train(cfg, shards / "train", on_log=die_at_4, eval_root=shards / "val")
    resumed = []
    train(cfg, shards / "train", on_log=lambda s, m: resumed.append((s, m.get("total_loss"), m.get("knn_top1"))),
          resume_from=tmp_path / "b", eval_root=shards / "val")
    assert resumed == straight[-len(resumed):] and len(resumed) == 2  # steps 5 and 6, as in the straight run
    a = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)["teacher"]
    b = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["teacher"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match="train.num_experts: not available when streaming shards"):
        train(tiny_config(train={"output_dir": str(tmp_path / "c"), "num_experts": 2}), shards / "train")
    with pytest.raises(DataError, match="leave nothing for reader"):
        tiny = tmp_path / "one"
        _synthetic_shards(tiny, [1])
        train(tiny_config(train={"output_dir": str(tmp_path / "d"), "batch_size": 1}, dataset={"num_workers": 2}), tiny)


@pytest.mark.slow
def test_training_streams_from_s3_as_from_the_folder(s3, s3_endpoint, tiles, tmp_path, monkeypatch):
    shards = pack_folder(tiles / "train", tmp_path / "shards", max_bytes=8 << 10)
    for path in (tmp_path / "shards").iterdir():
        s3.upload_file(str(path), BUCKET, f"datasets/tiles/shards/train/{path.name}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    losses = {}
    for name, source in (("local", tmp_path / "shards"), ("s3", f"s3://{BUCKET}/datasets/tiles/shards/train")):
        losses[name] = []
        cfg = tiny_config(train={"output_dir": str(tmp_path / name), "log_every": 1}, dataset={"open_shards": 3})
        train(cfg, source, on_log=lambda s, m, into=losses[name]: into.append(m["total_loss"]))
    assert losses["s3"] == losses["local"] and len(losses["local"]) == 6 and len(shards.shards) > 3

    s3.delete_object(Bucket=BUCKET, Key=f"datasets/tiles/shards/train/{shards.shards[1].name}")
    with pytest.raises(MissingInput, match=f"{shards.shards[1].name}: shard not found"):
        train(tiny_config(train={"output_dir": str(tmp_path / "gone")}), f"s3://{BUCKET}/datasets/tiles/shards/train")


def test_a_truncated_shard_is_named(tmp_path):
    index = _synthetic_shards(tmp_path / "ds" / "shards" / "train", [6])
    path = tmp_path / "ds" / "shards" / "train" / "part0-00000.tar"
    whole = path.read_bytes()
    path.write_bytes(whole[:700])  # inside a member
    with pytest.raises(DataError, match="part0-00000.tar: not a readable shard"):
        list(read_shard(path))
    report, _ = validate_dataset(tmp_path / "ds", "image_tiles_rgb", {"tile_size": 8}, tmp_path / "context")
    assert [(f.expectation, f.files, f.observed) for f in report.failures] == [
        ("shard_is_readable", ["shards/train/part0-00000.tar"], ["not a readable shard (unexpected end of data)"]),
        ("shard_matches_its_index", ["shards/train/part0-00000.tar"], [hashlib.md5(whole[:700]).hexdigest()])]
    # Cut at a member boundary, a tar reads as a shorter one: the index's count tells.
    path.write_bytes(whole[:1500])
    report, _ = validate_dataset(tmp_path / "ds", "image_tiles_rgb", {"tile_size": 8}, tmp_path / "context")
    [failure] = [f for f in report.failures if f.expectation == "shard_holds_its_indexed_samples"]
    assert failure.files == ["shards/train/part0-00000.tar"] and failure.observed == [1] and not report.success
    # A member that claims a size no tile has is not read into memory.
    header = tarfile.TarInfo("s00000.png")
    header.size = 1 << 40
    path.write_bytes(header.tobuf() + b"\0" * 512)
    with pytest.raises(DataError, match=r"part0-00000.tar: member 's00000.png' claims 1,099,511,627,776 bytes"):
        list(read_shard(path))
    path.write_bytes(whole[:1500])
    with pytest.raises(ShardDamaged, match=r"part0-00000.tar: md5 [0-9a-f]{32}, its index says " + index.shards[0].md5):
        list(itertools.islice(ShardOrder(index, seed=0, open_shards=1, buffer=2)(Reader(0, 1), 0), 7))
    order = ShardOrder(index, seed=0, open_shards=1, buffer=2, verify="off")  # trusted, the count still tells
    with pytest.raises(DataError, match="1 samples, its index says 6"):
        list(itertools.islice(order(Reader(0, 1), 0), 7))


def _rot(shard: Path) -> str:
    """Bit rot in the middle of the first image of ``shard``, its size and modification time kept
    (as a failing disk, or a restore with cp -p, leaves them): the key of the damaged sample."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    stat = shard.stat()
    middle = member.offset_data + member.size // 2
    with shard.open("r+b") as f:
        f.seek(middle)
        flipped = bytes(b ^ 0xFF for b in f.read(8))
        f.seek(middle)
        f.write(flipped)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return member.name.split(".")[0]


def test_training_checks_each_shard_against_its_index_and_names_a_damaged_one(tiles, tmp_path, caplog):
    shards = tmp_path / "shards"
    index = pack_folder(tiles / "train", shards, max_bytes=8 << 10)
    damaged = index.shards[1].name
    key = _rot(shards / damaged)

    def run(verify: str, name: str):
        return train(tiny_config(train={"output_dir": str(tmp_path / name)}, dataset={"verify_shards": verify}), shards)

    with pytest.raises(ShardDamaged, match=rf"{damaged}: md5 [0-9a-f]{{32}}, its index says {index.shards[1].md5}"):
        run("stop", "stop")
    run("skip", "skip")  # trains on the others, and says which one it left out
    assert f"{damaged}: md5" in caplog.text and "left out (dataset.verify_shards=skip)" in caplog.text
    # Trusted without a check, the damaged image itself is named by shard and sample.
    with pytest.raises(DataError, match=rf"{damaged}: sample {key}'s 'png': not a readable image"):
        run("off", "off")


def test_a_hostile_or_broken_index_is_refused_by_name(tmp_path):
    index = _synthetic_shards(tmp_path, [3])
    good = json.loads(index.to_json())
    for change, expected in (
        ({"shards": [{**good["shards"][0], "name": "../../etc/passwd.tar"}]}, "shard '../../etc/passwd.tar'"),
        ({"shards": [{**good["shards"][0], "samples": 0}]}, "a positive count"),
        ({"shards": [{"name": "x.tar"}]}, "not a shard index (TypeError"),
        ({"image": None, "classes": None}, "not a shard index"),
        ({"format": "webdataset"}, "format 'webdataset', expected 'vision-foundry-shards/1'"),
    ):
        (tmp_path / INDEX).write_text(json.dumps({**good, **change}))
        with pytest.raises(DataError, match=re.escape(expected)):
            read_index(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({**good, "classes": ["cats", "dogs"]}))
    with pytest.raises(DataError, match=r"sample s00000 is labelled 'even', not one of its index's classes"):
        labelled_images(tmp_path, 3)
    (tmp_path / INDEX).write_text(json.dumps(good))
    with pytest.raises(ConfigError, match=r"dataset.shard_image: .* holds png, not '20x.png'"):
        train(tiny_config(train={"output_dir": str(tmp_path / "out")}, dataset={"shard_image": "20x.png"}), tmp_path)


def test_a_sample_whose_image_does_not_decode_is_named(tmp_path):
    root = tmp_path / "shards" / "train"
    _synthetic_shards(root, [4], side=32)
    path = root / "part0-00000.tar"
    whole = path.read_bytes()
    second = whole.index(b"IDAT", whole.index(b"s00001.png"))  # the second sample's pixel data
    path.write_bytes(whole[:second + 8] + bytes(64) + whole[second + 72:])  # same length: the tar still reads
    with pytest.raises(DataError, match=rf"{root}: sample s00001: not a readable image \("):
        labelled_images(root, 3)
