"""Image files as a backbone takes them (dinomx.images)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinomx.errors import DataError
from dinomx.images import list_images, load_image, to_model_mode, upright_size, window_hu
from tests.conftest import sideways_photo


def test_hu_window_maps_to_unit_range():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert window_hu(hu, center=40, width=400).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_wide_images_are_scaled_by_the_bits_they_use_never_clipped():
    low, high = (to_model_mode(Image.fromarray(np.full((4, 4), v, np.uint16)), 3) for v in (1000, 40000))
    assert low.mode == "RGB" and np.asarray(low).max() == 249 and np.asarray(high).max() == 156  # /1023, /65535
    # A 14-bit detector's image in a 16-bit PNG keeps its contrast (/16383, not /65535 -> 0..64).
    ramp = np.linspace(0, 16383, 64, dtype=np.uint16).reshape(8, 8)
    assert np.asarray(to_model_mode(Image.fromarray(ramp), 1)).max() == 255
    forced = to_model_mode(Image.fromarray(ramp), 1, value_range=(0, 65535))
    assert np.asarray(forced).max() == 64
    half = to_model_mode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), 1)
    assert half.mode == "L" and np.asarray(half).max() == 128
    with pytest.raises(DataError, match=r"float image with values in \[0, 3\]; expected 0..1"):
        to_model_mode(Image.fromarray(np.array([[0.0, 3.0]], np.float32)), 3)
    with pytest.raises(DataError, match=r"I integer image with values in \[-5, 70000\]"):
        to_model_mode(Image.fromarray(np.array([[-5, 70000]], np.int32)), 3)
    with pytest.raises(DataError, match="float image with values in \\[nan"):
        to_model_mode(Image.fromarray(np.array([[np.nan, 0.5]], np.float32)), 3)


def test_exif_orientation_is_applied_and_gif_and_webp_are_read(tmp_path):
    sideways_photo(tmp_path / "phone.jpg")  # stored 8 wide, 4 high; seen 4 wide, 8 high
    with Image.open(tmp_path / "phone.jpg") as img:
        assert img.size == (8, 4) and upright_size(img) == (4, 8)
    seen = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert seen.shape == (8, 4, 3) and seen[:2].mean() > 200 and seen[2:].mean() < 50  # the left band is on top

    (tmp_path / "glands").mkdir()
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (200, 20)]
    frames[0].save(tmp_path / "glands" / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "glands" / "b.webp", lossless=True)
    paths, _, _ = list_images(tmp_path)
    assert [p.name for p in paths] == ["a.gif", "b.webp"]
    assert [int(np.asarray(load_image(p)).mean()) for p in paths] == [200, 200]  # a GIF's first frame


def test_a_file_that_does_not_decode_is_named_with_what_is_wrong(tmp_path):
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(whole)
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:100])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    body = bytearray(whole.read_bytes())
    body[12:16] = b"XXXX"  # the header chunk's name: the PNG signature holds, the body does not
    (tmp_path / "broken.png").write_bytes(bytes(body))
    for name, problem in (("cut.png", r"truncated or corrupt after 100 bytes"), ("empty.png", r"empty file \(0 bytes\)"),
                          ("notes.jpg", r"its content is not a JPG image"), ("gone.png", "no such file"),
                          ("broken.png", rf"a PNG signature, then content that does not decode as PNG \(corrupt or cut "
                                         rf"short, {len(body)} bytes\)")):
        with pytest.raises(DataError, match=rf"{tmp_path / name}: not a readable image \({problem}"):
            load_image(tmp_path / name)
