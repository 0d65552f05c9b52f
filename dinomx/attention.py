"""What the backbone looks at: last-layer CLS->patch attention per head, and a PCA of it.

    python -m dinomx.attention --model outputs/pretrain/<run>/backbone --out attn/ tile1.png tile2.png

For each image it writes ``<stem>_heads.png`` (input, then one panel per head) and
``<stem>_pca.png`` (input, then the first ``k`` principal components of the heads as RGB, with
patches outside the thresholded attention mass blacked out).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedModel

from dinomx.backbone import Backbone, load_image_processor
from dinomx.errors import run_command
from dinomx.images import load_image, to_model_mode


def eager_twin(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` with eager attention, sharing its weights. Fused kernels return no attention
    weights, and switching a shared model's implementation back and forth would change it under
    its other callers (a service answers /embed while /attention runs)."""
    if model.config._attn_implementation == "eager":
        return model
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(keep_vars=True), assign=True, strict=False)
    if any(t.is_meta for t in itertools.chain(twin.parameters(), twin.buffers())):
        twin = copy.deepcopy(model)  # a layer the state dict does not hold: copy rather than share
    twin.set_attn_implementation("eager")
    return twin.train(model.training)


@torch.no_grad()
def cls_attention(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, heads, h, w): last-layer attention of the CLS token to each patch. ``model`` uses eager
    attention (see ``eager_twin``)."""
    attentions = model(pixel_values=pixel_values, output_attentions=True).attentions[-1]
    patch = model.config.patch_size
    h, w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    return attentions[:, :, 0, -h * w :].reshape(attentions.shape[0], attentions.shape[1], h, w)


def attention_mask(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Per map, the smallest set of patches holding ``mass`` of the attention (DINO's threshold)."""
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    cumulative = values.cumsum(-1) / values.sum(-1, keepdim=True)
    keep_sorted = cumulative - values / values.sum(-1, keepdim=True) < mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view_as(maps)


def pca_channels(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(n, d) -> (n, k) principal components, each scaled to [0, 1]."""
    centered = features - features.mean(0, keepdim=True)
    k = min(k, *centered.shape)
    _, _, v = torch.pca_lowrank(centered, q=k, center=False)
    projected = centered @ v[:, :k]
    lo, hi = projected.min(0).values, projected.max(0).values
    return (projected - lo) / (hi - lo).clamp_min(1e-8)


def _panel(array: np.ndarray, size: tuple[int, int]) -> Image.Image:
    array = np.clip(array * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(array).resize(size, Image.NEAREST)


def render(image: Image.Image, maps: torch.Tensor, k: int = 3, mass: float = 0.6) -> tuple[Image.Image, Image.Image]:
    """(heads strip, PCA strip) for one image and its (heads, h, w) attention."""
    size = image.size
    rgb = image.convert("RGB")
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    normalised = (maps - lo) / (hi - lo).clamp_min(1e-12)
    heads = [rgb] + [_panel(m.numpy(), size).convert("RGB") for m in normalised]
    h, w = maps.shape[-2:]
    components = pca_channels(maps.flatten(1).T, k)  # patches described by their per-head attention
    colour = F.pad(components, (0, 3 - components.shape[1])).view(h, w, 3)
    foreground = attention_mask(maps.mean(0, keepdim=True), mass)[0]
    colour = colour * foreground.unsqueeze(-1)
    pca = [rgb, _panel(colour.numpy(), size)]
    return _strip(heads), _strip(pca)


def _strip(panels: list[Image.Image]) -> Image.Image:
    width, height = panels[0].size
    strip = Image.new("RGB", (width * len(panels), height))
    for i, panel in enumerate(panels):
        strip.paste(panel, (i * width, 0))
    return strip


def write_attention_pngs(model_dir: str | Path, images: list[tuple[str, Image.Image]], out: str | Path, k: int = 3,
                         scale: int = 4) -> list[Path]:
    """``<name>_heads.png`` and ``<name>_pca.png`` of each named image."""
    backbone = Backbone.from_pretrained(model_dir).eval()
    eager = eager_twin(backbone.model)
    processor = load_image_processor(model_dir)
    channels = backbone.model.config.num_channels
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in images:
        image = to_model_mode(image, channels)
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        maps = cls_attention(eager, pixels)[0]
        shown = image.resize((pixels.shape[-1] * scale, pixels.shape[-2] * scale), Image.BILINEAR)
        heads, pca = render(shown, maps, k)
        for suffix, picture in (("heads", heads), ("pca", pca)):
            target = out / f"{name}_{suffix}.png"
            picture.save(target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a save_pretrained backbone directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=int, default=3, help="PCA components shown as colour channels (1-3)")
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.k <= 3:
        parser.error("--k: expected 1, 2 or 3")

    def run() -> None:
        images = [(path.stem, load_image(path)) for path in args.images]
        for path in write_attention_pngs(args.model, images, args.out, args.k):
            print(path)

    return run_command("dinomx.attention", run)


if __name__ == "__main__":
    sys.exit(main())
