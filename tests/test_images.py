"""Image files as a backbone takes them (dinomx.images)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinomx.errors import DataError
from dinomx.images import to_model_mode, window_hu


def test_hu_window_maps_to_unit_range():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert window_hu(hu, center=40, width=400).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_wide_images_are_scaled_by_their_range_never_clipped():
    low, high = (to_model_mode(Image.fromarray(np.full((4, 4), v, np.uint16)), 3) for v in (1000, 40000))
    assert low.mode == "RGB" and np.asarray(low).max() == 4 and np.asarray(high).max() == 156  # v / 257
    half = to_model_mode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), 1)
    assert half.mode == "L" and np.asarray(half).max() == 128
    with pytest.raises(DataError, match=r"float image with values in \[0, 3\]; expected 0..1"):
        to_model_mode(Image.fromarray(np.array([[0.0, 3.0]], np.float32)), 3)
    with pytest.raises(DataError, match=r"I integer image with values in \[-5, 70000\]"):
        to_model_mode(Image.fromarray(np.array([[-5, 70000]], np.int32)), 3)
    with pytest.raises(DataError, match="float image with values in \\[nan"):
        to_model_mode(Image.fromarray(np.array([[np.nan, 0.5]], np.float32)), 3)
