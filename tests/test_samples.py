import hashlib
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data.samples import COLOUR_PHOTOGRAPHS, PATCH, PER_CLASS, PHOTOGRAPHS, faces, main, photos, textures
from dinomx.images import list_images


def test_digits_are_written_whole_as_a_fixed_rgb_split(tmp_path, capsys):
    assert main(["digits", str(tmp_path / "digits"), "--size", "24"]) == 0
    root = tmp_path / "digits"
    counted = re.fullmatch(r".*digits: 1,797 images of 10 classes, (\d,?\d+) train and (\d+) val \(24x24 RGB PNG\)\n",
                           capsys.readouterr().out)
    assert counted and int(counted[1].replace(",", "")) + int(counted[2]) == 1797
    train_paths, train_labels, classes = list_images(root / "train")
    val_paths, val_labels, _ = list_images(root / "val")
    assert classes == [str(d) for d in range(10)]
    assert len(train_paths) + len(val_paths) == len(load_digits().images) == 1797  # nothing dropped
    assert {p.stem for p in train_paths}.isdisjoint({p.stem for p in val_paths})
    assert all(np.bincount(val_labels) >= 40)
    with Image.open(train_paths[0]) as img:
        assert img.mode == "RGB" and img.size == (24, 24)
        pixels = np.asarray(img)
    assert (pixels[..., 0] == pixels[..., 1]).all() and pixels.max() > 200  # grey in every channel, full range


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.mark.parametrize("cut, photographs, colour", [(textures, PHOTOGRAPHS, False), (photos, COLOUR_PHOTOGRAPHS, True)])
def test_patches_of_train_and_val_share_no_pixel_and_are_the_same_each_time(tmp_path, cut, photographs, colour):
    root = cut(tmp_path / "a", size=32)
    train_paths, train_labels, classes = list_images(root / "train")
    _, val_labels, _ = list_images(root / "val")
    assert classes == sorted(photographs)
    channels = np.stack([np.asarray(Image.open(p)) for p in train_paths[::50]]).astype(int)
    # grey is the same value in every channel; colour patches differ between channels
    assert (np.abs(channels[..., 0] - channels[..., 2]).mean() > 5) == colour
    assert (np.bincount(train_labels) == PER_CLASS["train"]).all() and (np.bincount(val_labels) >= 40).all()
    for label in classes:
        rows = {split: [int(re.match(r"y(\d+)x", p.stem).group(1)) for p in (root / split / label).glob("*.png")]
                for split in ("train", "val")}
        # Train patches end above the first row any val patch starts on: no pixel is in both.
        assert max(rows["train"]) + PATCH <= min(rows["val"]), label
    assert _digest(root) == _digest(cut(tmp_path / "b", size=32))


def test_faces_are_lfw_faces_against_other_photographs_in_a_fixed_split(tmp_path):
    root = faces(tmp_path / "faces", size=32)
    train_paths, train_labels, classes = list_images(root / "train")
    val_paths, val_labels, _ = list_images(root / "val")
    assert classes == ["face", "other"]
    assert np.bincount(train_labels).tolist() == [75, 75] and np.bincount(val_labels).tolist() == [25, 25]
    with Image.open(val_paths[0]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
