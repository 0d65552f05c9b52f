"""Typed DINO-MX training configuration.

One YAML file, one section per concern. Loading validates every key and type so a typo fails
before a run starts, with the dotted path of the offending key in the message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dinomx.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class StudentConfig:
    # "scratch" builds a randomly initialised backbone from the fields below; a local HF
    # directory (or "hf:<repo id>" resolved from the local HF cache) loads pretrained weights,
    # and then arch, image_size, patch_size, num_channels, hidden_size, num_hidden_layers,
    # num_attention_heads, mlp_ratio, num_register_tokens and drop_path_rate are read from its
    # config.json (dinomx.backbone.pretrained_student): what is written here for them is ignored.
    pretrained: str = "scratch"
    arch: Literal["dinov2", "vit", "dinov2_with_registers"] = "dinov2"
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    mlp_ratio: int = 4
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0
    # Freeze the patch embedding and the first N transformer blocks (combinable with LoRA).
    freeze_blocks: int = 0
    gradient_checkpointing: bool = False


@dataclass
class LoRAConfig:
    """Low-rank adapters (``peft``) on the backbone; its base weights are then frozen."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 3


@dataclass
class DINOHeadConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    # Batch-normalised hidden layers (dinomx.dino_head); the teacher's head then uses batch
    # statistics too, as in DINO.
    use_bn: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    loss_weight: float = 1.0
    # KoLeo on the student's global CLS tokens; 0 turns it off.
    koleo_loss_weight: float = 0.0


@dataclass
class IBOTConfig:
    # Masked-patch prediction; a loss_weight of 0 turns iBOT off.
    loss_weight: float = 0.0
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    # With separate_head the patch tokens get their own head (sized below); otherwise the DINO head.
    separate_head: bool = False
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    use_bn: bool = False


@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    # Block i of n trains at lr * layerwise_decay ** (n - i); 1.0 turns it off.
    layerwise_decay: float = 1.0


@dataclass
class CropsConfig:
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    # DINO-LG: masks laid out like the training data (non-zero = annotated); each local crop is
    # centred on an annotated pixel with this probability.
    label_masks_root: str | None = None
    label_guided_probability: float = 0.5


@dataclass
class DatasetConfig:
    # Normalisation statistics travel with the saved backbone's image processor.
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # Photometric table: natural images (colour or greyscale), radiology (CT) or H&E histology
    # (dinomx.augmentations).
    augmentation: Literal["rgb", "gray", "ct", "he"] = "rgb"
    num_workers: int = 0


@dataclass
class DistillationConfig:
    # Frozen teachers (local save_pretrained directories or "hf:<repo id>"); empty turns it off.
    # Registered models (models:/name/version) are resolved to directories by the MLflow entry point.
    teachers: list[str] = field(default_factory=list)
    loss_weight: float = 1.0
    # Magnification-Aware Distillation: a folder laid out like the training data that holds, at
    # the same relative paths, the aligned low-magnification tiles the teachers see.
    paired_root: str | None = None


@dataclass
class DistributionConfig:
    # Processes come from `accelerate launch` (one per GPU, or --cpu with gloo); this section
    # says how they cooperate.
    # ddp replicates the model on every process; fsdp shards parameters, gradients and optimizer
    # state of student and teacher over them (FSDP2), for backbones too large to replicate.
    type: Literal["ddp", "fsdp"] = "ddp"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


@dataclass
class TrainConfig:
    batch_size: int = 64
    epochs: int = 100
    # One "epoch" is a fixed number of iterations, as in DINOv2's OFFICIAL_EPOCH_LENGTH, so that
    # schedules do not change meaning with the dataset size.
    steps_per_epoch: int = 1250
    seed: int = 0
    log_every: int = 10
    # Multi-expert training: N students, each on its own shard of the data, aggregated by the
    # EMA teacher (memory grows with N).
    num_experts: int = 1
    # A resumable checkpoint every N iterations (and at the end); 0 keeps only the final one.
    checkpoint_every: int = 0
    # Online kNN accuracy of the teacher every N iterations, given a labelled evaluation split
    # (dinomx.online_eval); 0 turns it off. eval_images caps the bank and the queries each.
    eval_every: int = 0
    eval_images: int = 1000
    # Stop (instead of only warning) when the diagnostics say the representation collapsed.
    stop_on_collapse: bool = False
    output_dir: str = "outputs/pretrain"


@dataclass
class DinoMXConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino_head: DINOHeadConfig = field(default_factory=DINOHeadConfig)
    ibot: IBOTConfig = field(default_factory=IBOTConfig)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)

    def __post_init__(self) -> None:
        _check_semantics(self)
        if self.student.pretrained == "scratch":  # else checked once the backbone's sizes are known
            check_model_fit(self)

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.train.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Every resolved value under its dotted key (``train.batch_size``)."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "DinoMXConfig":
        return _build(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "DinoMXConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        for item in overrides or []:
            _apply_override(data, item, str(path))
        return _build(cls, data, str(path))


def _apply_override(data: dict, item: str, source: str) -> None:
    """Apply one ``section.key=value`` override, the value parsed as YAML (``1e-3``, ``[1, 2]``)."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {parts[0]}: expected a mapping, got {type(section).__name__}")
    section[parts[1]] = yaml.safe_load(raw)


def _build(cls: type, data: Any, source: str, keypath: str = "") -> Any:
    path = f"{source}: {keypath}" if keypath else source
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {
        name: _coerce(hints[name], value, source, f"{keypath}.{name}" if keypath else name)
        for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _coerce(tp: Any, value: Any, source: str, keypath: str) -> Any:
    origin = typing.get_origin(tp)
    path = f"{source}: {keypath}"
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, keypath)
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{path}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, keypath)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{keypath}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, source, f"{keypath}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(arg, v, source, f"{keypath}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _check_semantics(cfg: DinoMXConfig) -> None:
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.steps_per_epoch": cfg.train.steps_per_epoch,
        "train.log_every": cfg.train.log_every,
        "train.num_experts": cfg.train.num_experts,
        "student.image_size": cfg.student.image_size,
        "student.patch_size": cfg.student.patch_size,
        "student.hidden_size": cfg.student.hidden_size,
        "crops.global_crops_size": cfg.crops.global_crops_size,
        "crops.local_crops_size": cfg.crops.local_crops_size,
        "dino_head.out_dim": cfg.dino_head.out_dim,
        "optim.lr": cfg.optim.lr,
        "train.eval_images": cfg.train.eval_images,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive value, got {value}")
    if cfg.lora_config.enabled and (cfg.lora_config.r <= 0 or not cfg.lora_config.target_modules):
        raise ConfigError("lora_config: expected r > 0 and at least one target module")
    for key, value in {"student.freeze_blocks": cfg.student.freeze_blocks, "train.checkpoint_every": cfg.train.checkpoint_every,
                       "train.eval_every": cfg.train.eval_every, "ibot.loss_weight": cfg.ibot.loss_weight,
                       "dino_head.koleo_loss_weight": cfg.dino_head.koleo_loss_weight}.items():
        if value < 0:
            raise ConfigError(f"{key}: expected >= 0, got {value}")
    if not 0 <= cfg.crops.label_guided_probability <= 1:
        raise ConfigError(f"crops.label_guided_probability: expected a probability, got {cfg.crops.label_guided_probability}")
    if cfg.distillation.paired_root and not cfg.distillation.teachers:
        raise ConfigError("distillation.paired_root: set distillation.teachers too; paired tiles are what teachers see")
    if not 0 < cfg.optim.layerwise_decay <= 1:
        raise ConfigError(f"optim.layerwise_decay: expected a value in (0, 1], got {cfg.optim.layerwise_decay}")
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not 0 <= lo <= hi < 1:
        raise ConfigError(f"ibot.mask_ratio_min_max: expected 0 <= min <= max < 1, got {[lo, hi]}")
    if not 0 <= cfg.ibot.mask_sample_probability <= 1:
        raise ConfigError(f"ibot.mask_sample_probability: expected a probability, got {cfg.ibot.mask_sample_probability}")
    if cfg.crops.local_crops_number < 0:
        raise ConfigError(f"crops.local_crops_number: expected >= 0, got {cfg.crops.local_crops_number}")
    for key in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(cfg.crops, key)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crops.{key}: expected 0 < min <= max <= 1, got {[lo, hi]}")
    if not 0 <= cfg.teacher.momentum_teacher <= cfg.teacher.final_momentum_teacher <= 1:
        raise ConfigError("teacher.momentum_teacher: expected 0 <= momentum_teacher <= final_momentum_teacher <= 1")


def check_model_fit(cfg: DinoMXConfig) -> None:
    """The rules that depend on the backbone's sizes: from the YAML for a scratch backbone, from
    its config.json for a pretrained one."""
    if not 0 <= cfg.student.freeze_blocks <= cfg.student.num_hidden_layers:
        raise ConfigError(
            f"student.freeze_blocks: expected 0..{cfg.student.num_hidden_layers} (student.num_hidden_layers), "
            f"got {cfg.student.freeze_blocks}"
        )
    if cfg.student.hidden_size % cfg.student.num_attention_heads:
        raise ConfigError(
            f"student.hidden_size: {cfg.student.hidden_size} is not divisible by "
            f"student.num_attention_heads={cfg.student.num_attention_heads}"
        )
    for key in ("global_crops_size", "local_crops_size"):
        size = getattr(cfg.crops, key)
        if size % cfg.student.patch_size:
            raise ConfigError(
                f"crops.{key}: {size} is not a multiple of student.patch_size={cfg.student.patch_size}"
            )
    if len(cfg.dataset.mean) != cfg.student.num_channels or len(cfg.dataset.std) != cfg.student.num_channels:
        raise ConfigError(
            f"dataset.mean/std: expected {cfg.student.num_channels} values "
            f"(student.num_channels), got {len(cfg.dataset.mean)}/{len(cfg.dataset.std)}"
        )
    if cfg.dataset.augmentation in ("rgb", "he") and cfg.student.num_channels != 3:
        raise ConfigError(
            f"dataset.augmentation: {cfg.dataset.augmentation!r} needs student.num_channels=3; "
            f"use 'ct' for {cfg.student.num_channels}-channel images"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
