import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinomx.attention import attention_mask, cls_attention, eager_twin, pca_channels, write_attention_pngs
from dinomx.augmentations import (
    DataAugmentationDINO,
    collate_crops,
    crop_box,
    gaussian_blur,
    hed_jitter,
    random_resized_crop,
)
from dinomx.backbone import Backbone
from dinomx.classifiers import ClassifierHeads, KNNClassifier, LinearClassifier
from dinomx.config import ConfigError, StudentConfig
from dinomx.dino_head import DINOHead
from dinomx.errors import DataError
from dinomx.images import to_model_mode, window_hu
from dinomx.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, TeacherCentering
from dinomx.masking import block_mask, sample_mask
from dinomx.schedules import CosineScheduler
from tests.conftest import tiny_config


def test_cosine_scheduler_warmup_freeze_and_end():
    s = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, freeze_iters=3)
    assert [s[i] for i in range(3)] == [0.0, 0.0, 0.0]
    assert s[3] == 0.0 and s[7] == pytest.approx(1.0)
    assert s[8] == pytest.approx(1.0)
    assert s[19] == pytest.approx(0.1, abs=0.02)
    assert s[100] == 0.1  # past the end it holds the final value
    values = [s[i] for i in range(8, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_dino_loss_is_cross_entropy_and_skips_same_view():
    loss = DINOLoss(out_dim=4, student_temp=1.0)
    teacher = [torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 0, 0]])]
    student = [torch.zeros(1, 4), torch.zeros(1, 4)]
    # Uniform student: cross-entropy against any one-hot target is log(4).
    assert loss(student, teacher, skip_same_view=True).item() == pytest.approx(math.log(4))
    # Student view 0 agrees with teacher view 0 only: skipping that pair leaves the mismatch.
    sharp = [torch.tensor([[20.0, 0, 0, 0]]), torch.tensor([[0, 20.0, 0, 0]])]
    assert loss(sharp, teacher, skip_same_view=True).item() > 10
    assert loss(sharp, teacher, skip_same_view=False).item() < loss(sharp, teacher, skip_same_view=True).item()


def test_center_tracks_teacher_mean_without_process_group():
    loss = DINOLoss(out_dim=3, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    assert torch.allclose(loss.centering.center, torch.tensor([[0.5, 0.5, 0.0]]))
    probs = loss.teacher_probs(torch.tensor([[1.0, 1.0, 1.0]]), teacher_temp=0.1)
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs[0, 2] > probs[0, 0]  # centering removed what the batch already agrees on


def test_dino_head_output_and_frozen_prototype_norm():
    head = DINOHead(in_dim=8, out_dim=32, hidden_dim=16, bottleneck_dim=4, nlayers=3, norm_last_layer=True)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 32)
    # Prototypes have unit norm, bottleneck is L2-normalised: logits are cosines.
    assert out.abs().max() <= 1.0 + 1e-5
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_random_resized_crop_and_blur_shapes():
    img = torch.rand(3, 40, 30)
    crop = random_resized_crop(img, 16, (0.2, 0.5), generator=torch.Generator().manual_seed(0))
    assert crop.shape == (3, 16, 16)
    blurred = gaussian_blur(img, 1.5)
    assert blurred.shape == img.shape and blurred.std() < img.std()


def test_multicrop_views_and_view_major_collate():
    cfg = tiny_config()
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std)
    samples = [aug(torch.rand(3, 32, 32), torch.Generator().manual_seed(i)) for i in range(3)]
    assert len(samples[0]["global_crops"]) == 2 and len(samples[0]["local_crops"]) == 2
    batch = collate_crops(samples)
    assert batch["global_crops"].shape == (6, 3, 32, 32)
    assert batch["local_crops"].shape == (6, 3, 16, 16)
    assert torch.equal(batch["global_crops"][1], samples[1]["global_crops"][0])
    assert torch.equal(batch["global_crops"][3], samples[0]["global_crops"][1])


def test_views_are_a_function_of_the_generator_seed():
    cfg = tiny_config()
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std)
    img = torch.rand(3, 32, 32)
    a, b = (aug(img, torch.Generator().manual_seed(7)) for _ in range(2))
    c = aug(img, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


@pytest.mark.parametrize("table", ["ct", "gray"])
def test_single_channel_views(table):
    cfg = tiny_config(student={"num_channels": 1}, dataset={"mean": [0.5], "std": [0.25], "augmentation": table})
    aug = DataAugmentationDINO(cfg.crops, cfg.dataset.mean, cfg.dataset.std, cfg.dataset.augmentation)
    views = aug(torch.rand(1, 32, 32), torch.Generator().manual_seed(0))
    assert views["global_crops"][0].shape == (1, 32, 32) and views["local_crops"][0].shape == (1, 16, 16)


def _keeps_channel_order(table: str, seeds: int = 30) -> bool:
    """Whether every view of a reddish tile stays redder than green everywhere."""
    cfg = tiny_config()
    aug = DataAugmentationDINO(cfg.crops, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), table)
    tile = torch.tensor([0.6, 0.35, 0.45]).view(3, 1, 1) + torch.rand(1, 32, 32) * 0.05
    for seed in range(seeds):
        for view in aug(tile, torch.Generator().manual_seed(seed))["global_crops"]:
            if not (view[0] > view[1]).all():
                return False
    return True


def test_ct_table_never_invents_colour_while_rgb_does():
    assert _keeps_channel_order("ct")
    assert not _keeps_channel_order("rgb")


def test_rgb_table_is_refused_for_single_channel_configs():
    with pytest.raises(ConfigError, match="dataset.augmentation: 'rgb' needs student.num_channels=3"):
        tiny_config(student={"num_channels": 1}, dataset={"mean": [0.5], "std": [0.25]})


def test_hed_jitter_is_identity_at_rest_and_moves_stain_otherwise():
    img = torch.rand(3, 8, 8) * 0.8 + 0.1
    same = hed_jitter(img, torch.ones(3), torch.zeros(3))
    assert torch.allclose(same, img, atol=1e-4)
    more_hematoxylin = hed_jitter(img, torch.tensor([1.3, 1.0, 1.0]), torch.zeros(3))
    assert more_hematoxylin.mean() < img.mean()  # more stain absorbs more light


def test_hu_window_maps_to_unit_range():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert window_hu(hu, center=40, width=400).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("arch", ["dinov2", "vit", "dinov2_with_registers"])
def test_backbones_return_cls_and_patches_at_any_crop_size(arch):
    cfg = StudentConfig(arch=arch, image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_register_tokens=2)
    backbone = Backbone.from_config(cfg)
    cls, patches = backbone(torch.randn(2, 3, 32, 32))
    assert cls.shape == (2, 32) and patches.shape == (2, 64, 32)
    cls, patches = backbone(torch.randn(2, 3, 16, 16))  # local crops: interpolated positions
    assert patches.shape == (2, 16, 32)


def test_knn_and_linear_heads_fit_separable_data_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), 20)
    x = (centres[y] + rng.normal(size=(60, 8))).astype(np.float32)
    heads = ClassifierHeads(["a", "b", "c"], {"knn": KNNClassifier(3, k=5).fit(x, y),
                                              "linear": LinearClassifier(3).fit(x, y)}, "linear", 8)
    for name in ("knn", "linear"):
        assert (heads.predict_proba(x, name).argmax(1) == y).mean() > 0.95
    heads.save_pretrained(tmp_path)
    loaded = ClassifierHeads.from_pretrained(tmp_path)
    assert loaded.classes == ["a", "b", "c"] and loaded.default == "linear"
    for name in ("knn", "linear"):
        np.testing.assert_allclose(loaded.predict_proba(x, name), heads.predict_proba(x, name), rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected embeddings of shape \(n, 8\)"):
        loaded.predict_proba(x[:, :4])
    with pytest.raises(KeyError, match="unknown head 'svm'"):
        loaded.predict_proba(x, "svm")


def test_sinkhorn_knopp_balances_prototypes_without_a_process_group():
    centering = TeacherCentering(out_dim=4, mode="sinkhorn_knopp", sinkhorn_iterations=20)
    # Every sample prefers prototype 0: Sinkhorn spreads the batch over all prototypes anyway.
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4) + torch.eye(4) * 0.1
    probs = centering(logits, teacher_temp=0.1)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-4)
    assert torch.allclose(probs.sum(dim=0), torch.ones(4), atol=1e-2)
    assert probs.argmax(dim=1).tolist() == [0, 1, 2, 3]
    centering.update(logits)  # no centre for Sinkhorn
    assert centering.center.abs().sum() == 0


def test_koleo_spreads_features_and_is_safe_on_tiny_or_duplicate_batches():
    koleo = KoLeoLoss()
    spread = koleo(torch.eye(4))
    clustered = koleo(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]))
    assert clustered > spread
    assert koleo(torch.randn(1, 8)).item() == 0.0
    duplicates = koleo(torch.ones(3, 8))
    assert torch.isfinite(duplicates) and duplicates > clustered
    x = torch.randn(5, 8, requires_grad=True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all()


def test_ibot_loss_weights_each_image_equally():
    loss = IBOTPatchLoss(out_dim=3, student_temp=1.0)
    masks = torch.tensor([[True, False, False], [True, True, True]])
    teacher = torch.tensor([[1.0, 0, 0]] * 4)
    # Image 0's single patch is right, image 1's three patches are wrong.
    student = torch.tensor([[50.0, 0, 0], [0, 50.0, 0], [0, 50.0, 0], [0, 50.0, 0]])
    value = loss(student, teacher, masks)
    assert value.item() == pytest.approx((0.0 + 50.0) / 2, abs=1e-3)


def test_block_masks_hit_their_ratio_in_rectangles():
    g = torch.Generator().manual_seed(0)
    mask = block_mask(8, 20, g)
    assert 12 <= int(mask.sum()) <= 20
    assert sample_mask(8, (0.2, 0.4), probability=0.0, generator=g).sum() == 0
    ratios = [sample_mask(8, (0.2, 0.4), probability=1.0, generator=g).float().mean().item() for _ in range(20)]
    assert all(0.1 <= r <= 0.4 for r in ratios)


def test_attention_mass_threshold_and_pca():
    maps = torch.tensor([[[0.5, 0.3], [0.15, 0.05]]])
    assert attention_mask(maps, mass=0.6).tolist() == [[[True, True], [False, False]]]
    assert attention_mask(maps, mass=0.9).sum() == 3
    features = torch.randn(50, 6)
    features[:, 0] *= 10  # the dominant direction becomes the first component
    components = pca_channels(features, k=3)
    assert components.shape == (50, 3) and components.min() >= 0 and components.max() <= 1
    first = components[:, 0] - components[:, 0].mean()
    assert abs(torch.corrcoef(torch.stack([first, features[:, 0]]))[0, 1]) > 0.95


@pytest.mark.parametrize("arch", ["dinov2", "vit"])
def test_cls_attention_per_head_and_pngs(tmp_path, tiles, arch):
    backbone = Backbone.from_config(StudentConfig(arch=arch, image_size=32, patch_size=4, hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2))
    backbone.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = backbone(pixels)[0]
    twin = eager_twin(backbone.model)
    maps = cls_attention(twin, pixels)
    assert maps.shape == (2, 2, 8, 8)
    # The served model is never switched: it keeps its fused attention for concurrent callers.
    assert backbone.model.config._attn_implementation == "sdpa" and not twin.training
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixels)[0], fused)
        torch.testing.assert_close(twin(pixel_values=pixels).last_hidden_state[:, 0], fused, atol=1e-5, rtol=1e-4)
    if arch == "dinov2":  # every tensor is in its state dict: the twin shares the weights, no copy
        assert twin.embeddings.patch_embeddings.projection.weight is backbone.model.embeddings.patch_embeddings.projection.weight
    assert torch.allclose(maps.flatten(2).sum(-1), torch.ones(2, 2), atol=0.2)  # CLS row minus its self-attention
    cfg = tiny_config()
    backbone.save_pretrained(tmp_path / "model", cfg.dataset, 32)
    written = write_attention_pngs(tmp_path / "model", [next((tiles / "val/glands").iterdir())], tmp_path / "png", scale=2)
    assert [p.name for p in written] == ["glands_0000_heads.png", "glands_0000_pca.png"]
    assert Image.open(written[0]).size == (64 * 3, 64)  # input + one panel per head


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


def test_micro_batcher_coalesces_concurrent_calls_and_routes_results():
    import asyncio

    from serving.batching import MicroBatcher

    calls = []

    class Model:
        def double(self, batch):
            calls.append(len(batch))
            return batch * 2

    model = Model()

    async def main():
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50)
        requests = [np.full((n, 3), i, np.float32) for i, n in enumerate([1, 2, 1, 3, 1])]
        # Each request names the model's method anew, as the service does: a new bound method object.
        return await asyncio.gather(*(batcher(r, model.double) for r in requests)), requests

    results, requests = asyncio.run(main())
    assert calls == [8]  # five requests, one forward pass
    for got, sent in zip(results, requests):
        np.testing.assert_array_equal(got, sent * 2)


def test_micro_batcher_caps_batches_separates_models_and_fails_only_the_failed_batch():
    import asyncio

    from serving.batching import MicroBatcher

    def fn(batch):
        if (batch < 0).any():
            raise ValueError("bad pixels")
        return batch

    def other(batch):  # a newly loaded model: never batched with the old one
        return batch + 100

    async def main():
        batcher = MicroBatcher(max_batch=2, max_wait_ms=20)
        results = await asyncio.gather(batcher(np.ones((2, 1)), fn), batcher(-np.ones((1, 1)), fn),
                                       batcher(np.ones((1, 1)), fn), batcher(np.ones((1, 1)), other),
                                       return_exceptions=True)
        return results, batcher.batch_sizes

    (first, bad, shared, swapped), sizes = asyncio.run(main())
    assert first.shape == (2, 1) and isinstance(bad, ValueError) and isinstance(shared, ValueError)
    assert swapped.tolist() == [[101.0]] and sizes == [2, 2, 1]


def test_collapse_watch_starts_after_the_warmups_even_with_prototypes_frozen_throughout():
    from dinomx.schedules import Schedules

    cfg = tiny_config(optim={"warmup_epochs": 1, "freeze_last_layer_epochs": 2},
                      teacher={"warmup_teacher_temp_epochs": 0}, train={"epochs": 2, "steps_per_epoch": 3})
    assert Schedules.from_config(cfg).warmup_steps == 3  # the lr warm-up, not the 6 frozen steps


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
