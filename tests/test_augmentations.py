"""Multi-crop views, photometric tables, label-guided crops and iBOT block masks."""

import pytest
import torch

from dinomx.augmentations import (
    DataAugmentationDINO,
    crop_box,
    gaussian_blur,
    gaussian_noise,
    hed_jitter,
    random_resized_crop,
    stack_views,
)
from dinomx.config import ConfigError
from dinomx.masking import block_mask, sample_mask
from tests.conftest import tiny_config


def test_random_resized_crop_and_blur_shapes():
    img = torch.rand(3, 40, 30)
    crop = random_resized_crop(img, 16, (0.2, 0.5), generator=torch.Generator().manual_seed(0))
    assert crop.shape == (3, 16, 16)
    pair = torch.stack([img, img])
    blurred = gaussian_blur(pair, torch.tensor([0.0, 1.5]))
    assert blurred.shape == pair.shape and torch.equal(blurred[0], img) and blurred[1].std() < img.std()


def test_multicrop_views_and_view_major_collate():
    cfg = tiny_config()
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std)
    samples = [aug(torch.rand(3, 32, 32), torch.Generator().manual_seed(i)) for i in range(3)]
    assert len(samples[0]["global_crops"]) == 2 and len(samples[0]["local_crops"]) == 2
    stacked = stack_views(samples)
    assert torch.equal(stacked["global_crops"][1], samples[1]["global_crops"][0])
    assert torch.equal(stacked["global_crops"][3], samples[0]["global_crops"][1])
    batch = aug.collate(samples)
    assert set(batch) == {"global_crops", "local_crops"}  # the parameters are spent
    assert batch["global_crops"].shape == (6, 3, 32, 32)
    assert batch["local_crops"].shape == (6, 3, 16, 16)


@pytest.mark.parametrize("table", ["rgb", "gray", "ct", "he"])
def test_a_crop_looks_the_same_whatever_batch_it_is_in(table):
    """The photometric pass runs on whole batches; no crop's result may depend on the others."""
    cfg = tiny_config(dataset={"augmentation": table})
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std, table)
    samples = [aug(torch.rand(3, 32, 32), torch.Generator().manual_seed(i)) for i in range(6)]
    together = aug.collate(samples)
    for i, sample in enumerate(samples):
        alone = aug.collate([sample])
        for key in ("global_crops", "local_crops"):
            assert torch.allclose(together[key][i::len(samples)], alone[key], atol=1e-6), (key, i)


def test_views_are_a_function_of_the_generator_seed():
    cfg = tiny_config()
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std)
    img = torch.rand(3, 32, 32)
    a, b = (aug.collate([aug(img, torch.Generator().manual_seed(7))]) for _ in range(2))
    c = aug.collate([aug(img, torch.Generator().manual_seed(8))])
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


@pytest.mark.parametrize("table", ["ct", "gray"])
def test_single_channel_views(table):
    cfg = tiny_config(student={"num_channels": 1}, dataset={"mean": [0.5], "std": [0.25], "augmentation": table})
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std, cfg.dataset.augmentation)
    views = aug.collate([aug(torch.rand(1, 32, 32), torch.Generator().manual_seed(0))])
    assert views["global_crops"].shape == (2, 1, 32, 32) and views["local_crops"].shape == (2, 1, 16, 16)


def _keeps_channel_order(table: str, seeds: int = 30) -> bool:
    """Whether every view of a reddish tile stays redder than green everywhere."""
    cfg = tiny_config()
    aug = DataAugmentationDINO(cfg.crops, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), table)
    tile = torch.tensor([0.6, 0.35, 0.45]).view(3, 1, 1) + torch.rand(1, 32, 32) * 0.05
    views = aug.collate([aug(tile, torch.Generator().manual_seed(seed)) for seed in range(seeds)])["global_crops"]
    return bool((views[:, 0] > views[:, 1]).all())


def test_ct_table_never_invents_colour_while_rgb_does():
    assert _keeps_channel_order("ct")
    assert not _keeps_channel_order("rgb")


def test_rgb_table_is_refused_for_single_channel_configs():
    with pytest.raises(ConfigError, match="dataset.augmentation: 'rgb' needs student.num_channels=3"):
        tiny_config(student={"num_channels": 1}, dataset={"mean": [0.5], "std": [0.25]})


def test_hed_jitter_is_identity_at_rest_and_moves_stain_otherwise():
    img = torch.rand(1, 3, 8, 8) * 0.8 + 0.1
    same = hed_jitter(img, torch.ones(1, 3), torch.zeros(1, 3))
    assert torch.allclose(same, img, atol=1e-4)
    more_hematoxylin = hed_jitter(img, torch.tensor([[1.3, 1.0, 1.0]]), torch.zeros(1, 3))
    assert more_hematoxylin.mean() < img.mean()  # more stain absorbs more light


def test_gaussian_noise_leaves_quiet_rows_alone_and_draws_each_field_from_its_seed():
    x = torch.full((3, 2, 64, 64), 0.5)
    out = gaussian_noise(x, torch.tensor([0.0, 0.03, 0.03]), torch.tensor([0.0, 7.0, 7.0]))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], out[2])  # same seed, same field, wherever the row is
    assert torch.equal(out[1, 0], out[1, 1])  # one field for every channel
    assert abs((out[1] - 0.5).std().item() - 0.03) < 0.003
    other = gaussian_noise(x[:1], torch.tensor([0.03]), torch.tensor([8.0]))
    assert not torch.equal(other[0], out[1])


def test_label_guided_crop_boxes_contain_the_annotated_pixel():
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = crop_box(40, 30, (0.05, 0.3), generator=g, center=(38, 2))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
        assert top <= 38 < top + h and left <= 2 < left + w


def test_local_crops_follow_the_label_mask():
    cfg = tiny_config(crops={"label_guided_probability": 1.0, "local_crops_number": 6, "local_crops_scale": [0.05, 0.1]})
    aug = DataAugmentationDINO(cfg.crops, (0.0,) * 3, (1.0,) * 3, "ct")
    img = torch.zeros(3, 32, 32)
    img[:, 24:, 24:] = 1.0  # only the annotated corner is bright
    mask = torch.zeros(32, 32)
    mask[26:30, 26:30] = 1
    views = aug(img, torch.Generator().manual_seed(0), label_mask=mask)
    assert all(crop.mean() > 0.3 for crop in views["local_crops"])
    unguided = aug(img, torch.Generator().manual_seed(0))
    assert any(crop.mean() < 0.3 for crop in unguided["local_crops"])


def test_block_masks_hit_their_ratio_in_rectangles():
    g = torch.Generator().manual_seed(0)
    mask = block_mask(8, 20, g)
    assert 12 <= int(mask.sum()) <= 20
    assert sample_mask(8, (0.2, 0.4), probability=0.0, generator=g).sum() == 0
    ratios = [sample_mask(8, (0.2, 0.4), probability=1.0, generator=g).float().mean().item() for _ in range(20)]
    assert all(0.1 <= r <= 0.4 for r in ratios)
