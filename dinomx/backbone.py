"""Hugging Face ViT backbones: build from the student config, load pretrained, save for AutoModel."""
from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    PreTrainedModel,
    ViTConfig,
)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from dinomx.config import ConfigError, DatasetConfig, DinoMXConfig, LoRAConfig, StudentConfig, check_model_fit
from dinomx.errors import MissingInput
from dinomx.hub import resolve_pretrained

# Transformer block index in a parameter name: Dinov2 `encoder.layer.3.`, ViT `layers.3.`.
_BLOCK_INDEX = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


# Fields that StudentConfig and every supported HF config name alike.
_SHARED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "num_channels")


def _hf_config(cfg: StudentConfig):
    common = {name: getattr(cfg, name) for name in _SHARED_FIELDS}
    if cfg.arch == "vit":
        return ViTConfig(intermediate_size=cfg.hidden_size * cfg.mlp_ratio, **common)
    if cfg.arch == "dinov2_with_registers":
        return Dinov2WithRegistersConfig(
            mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=cfg.drop_path_rate,
            num_register_tokens=cfg.num_register_tokens,
            **common,
        )
    return Dinov2Config(mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate, **common)


def pretrained_student(cfg: DinoMXConfig) -> DinoMXConfig:
    """``cfg`` with the student's architecture fields read from a pretrained backbone's
    config.json (the YAML's values for them are ignored), checked against the crops and data
    statistics. A scratch student is returned as it is."""
    source = cfg.student.pretrained
    if source == "scratch":
        return cfg
    path = resolve_pretrained(source)
    try:
        hf = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"student.pretrained: cannot read the config of {source!r}: {exc}") from None
    if hf.model_type not in ("dinov2", "vit", "dinov2_with_registers"):
        raise ConfigError(f"student.pretrained: {source!r} is a {hf.model_type!r} model; expected dinov2, vit or "
                          "dinov2_with_registers")
    student = cfg.student.replace(
        arch=hf.model_type,
        **{name: getattr(hf, name) for name in _SHARED_FIELDS},
        mlp_ratio=int(getattr(hf, "mlp_ratio", 0) or hf.intermediate_size // hf.hidden_size),
        num_register_tokens=getattr(hf, "num_register_tokens", 0),
        drop_path_rate=float(getattr(hf, "drop_path_rate", 0.0)),
    )
    resolved = cfg.replace(student=student)
    try:
        check_model_fit(resolved)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (student.* read from the config.json of {source!r})") from None
    return resolved


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter for freezing and layer-wise lr decay: 0 for the embeddings, i + 1 for
    transformer block i, ``num_layers + 1`` for everything above (final norm, heads)."""
    if ".embeddings." in f".{name}":
        return 0
    block = _BLOCK_INDEX.search(name)
    return int(block.group(1)) + 1 if block else num_layers + 1


class Backbone(nn.Module):
    """Uniform view over HF vision transformers: ``forward`` returns (CLS token, patch tokens)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self._num_prefix = 1 + getattr(model.config, "num_register_tokens", 0)
        # ViTModel interpolates position embeddings for local crops only when asked to.
        self._forward_kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}

    @property
    def embed_dim(self) -> int:
        return self.model.config.hidden_size

    def add_lora(self, lora: LoRAConfig) -> None:
        """Wrap the model with LoRA adapters; only the adapters stay trainable."""
        # peft is imported here, not with the module: a service loading exported backbones never
        # needs it, and it costs half a second of every worker's start.
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
        try:
            self.model = get_peft_model(self.model, config)
        except ValueError as exc:
            raise ConfigError(f"lora_config.target_modules: {exc}") from None

    def freeze_blocks(self, count: int) -> None:
        """Freeze the embeddings and the first ``count`` blocks, adapters included."""
        if count <= 0:
            return
        for name, param in self.model.named_parameters():
            if layer_depth(name, self.model.config.num_hidden_layers) <= count:
                param.requires_grad = False

    def export_model(self) -> PreTrainedModel:
        """A plain ``transformers`` model: LoRA adapters merged into a copy of the weights."""
        peft = sys.modules.get("peft")  # without it imported, nothing can have been wrapped
        if peft is not None and isinstance(self.model, peft.PeftModel):
            return copy.deepcopy(self.model).merge_and_unload()
        return self.model

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``bool_masked_pos`` (N, P) replaces those patch embeddings with the mask token (iBOT)."""
        kwargs = dict(self._forward_kwargs)
        if bool_masked_pos is not None:
            kwargs["bool_masked_pos"] = bool_masked_pos
        hidden = self.model(pixel_values=pixel_values, **kwargs).last_hidden_state
        return hidden[:, 0], hidden[:, self._num_prefix :]

    @classmethod
    def from_config(cls, cfg: StudentConfig) -> "Backbone":
        if cfg.pretrained == "scratch":
            config = _hf_config(cfg)
            source = None
        else:
            source = resolve_pretrained(cfg.pretrained)
            config = AutoConfig.from_pretrained(source)
        # DINO trains the CLS token itself, so ViT's tanh pooler would get no gradient; iBOT needs
        # ViT's optional mask token (Dinov2 models always have one).
        kwargs = {"add_pooling_layer": False, "use_mask_token": True} if config.model_type == "vit" else {}
        model = AutoModel.from_config(config, **kwargs) if source is None else AutoModel.from_pretrained(source, **kwargs)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable()
        return cls(model)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Backbone":
        if not (Path(directory) / "config.json").is_file():  # else transformers reads it as a hub id
            raise MissingInput(f"{directory}: no saved backbone (expected the config.json and weights of save_pretrained)")
        return cls(AutoModel.from_pretrained(directory))

    def save_pretrained(self, directory: str | os.PathLike, dataset: DatasetConfig, image_size: int) -> None:
        self.export_model().save_pretrained(directory)
        build_image_processor(dataset, image_size, self.model.config.num_channels).save_pretrained(directory)


def build_image_processor(dataset: DatasetConfig, image_size: int, num_channels: int) -> BitImageProcessorPil:
    return BitImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(dataset.mean),
        image_std=list(dataset.std),
        do_convert_rgb=num_channels == 3,
    )


def load_image_processor(directory: str | os.PathLike):
    return AutoImageProcessor.from_pretrained(directory)
