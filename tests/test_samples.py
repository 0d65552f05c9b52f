import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from data.samples import digits
from dinomx.images import list_images


def test_digits_are_written_whole_as_a_fixed_rgb_split(tmp_path):
    root = digits(tmp_path / "digits", size=24)
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
