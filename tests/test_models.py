"""Backbones, the DINO head, the kNN/linear heads and attention maps."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinomx.attention import attention_mask, cls_attention, eager_twin, pca_channels, write_attention_pngs
from dinomx.attention import main as attention_command
from dinomx.backbone import Backbone
from dinomx.classifiers import ClassifierHeads, KNNClassifier, LinearClassifier
from dinomx.config import StudentConfig
from dinomx.dino_head import DINOHead
from tests.conftest import tiny_config


@pytest.mark.parametrize("arch", ["dinov2", "vit", "dinov2_with_registers"])
def test_backbones_return_cls_and_patches_at_any_crop_size(arch):
    cfg = StudentConfig(arch=arch, image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_register_tokens=2)
    backbone = Backbone.from_config(cfg)
    cls, patches = backbone(torch.randn(2, 3, 32, 32))
    assert cls.shape == (2, 32) and patches.shape == (2, 64, 32)
    cls, patches = backbone(torch.randn(2, 3, 16, 16))  # local crops: interpolated positions
    assert patches.shape == (2, 16, 32)


def test_dino_head_output_and_frozen_prototype_norm():
    head = DINOHead(in_dim=8, out_dim=32, hidden_dim=16, bottleneck_dim=4, nlayers=3, norm_last_layer=True)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 32)
    # Prototypes have unit norm, bottleneck is L2-normalised: logits are cosines.
    assert out.abs().max() <= 1.0 + 1e-5
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


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
    first = next((tiles / "val/glands").iterdir())
    written = write_attention_pngs(tmp_path / "model", [(first.stem, Image.open(first))], tmp_path / "png", scale=2)
    assert [p.name for p in written] == ["glands_0000_heads.png", "glands_0000_pca.png"]
    assert Image.open(written[0]).size == (64 * 3, 64)  # input + one panel per head


def test_the_attention_command_names_an_unreadable_image_and_a_missing_model(tmp_path, capsys):
    student = StudentConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    Backbone.from_config(student).save_pretrained(tmp_path / "model", tiny_config().dataset, 32)
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "tile.png")
    for model, image, said in (("model", "notes.png", f"{tmp_path / 'notes.png'}: not a readable image"),
                               ("gone", "tile.png", f"{tmp_path / 'gone'}: no saved backbone")):
        args = ["--model", str(tmp_path / model), "--out", str(tmp_path / "png"), str(tmp_path / image)]
        assert attention_command(args) == 2
        assert said in capsys.readouterr().err
    assert attention_command(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "png"), str(tmp_path / "tile.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["tile_heads.png", "tile_pca.png"]
