"""Typed DINO-MX training configuration.

One YAML file, one section per concern. Loading validates every key and type so a typo fails
before a run starts, with the dotted path of the offending key in the message.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from dinomx.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _as_tuple(value: Any) -> Any:
    """YAML has lists where the config holds fixed-length tuples."""
    return tuple(value) if isinstance(value, list) else value


def _as_pair(value: Any) -> Any:
    value = _as_tuple(value)
    if isinstance(value, tuple) and len(value) != 2:
        raise ConfigError(f"expected 2 values, got {len(value)}")
    return value


Pair = Annotated[tuple[float, float], BeforeValidator(_as_pair)]
Floats = Annotated[tuple[float, ...], BeforeValidator(_as_tuple)]


class Section(BaseModel):
    """A config section: strict types (no "1" for 1, no 1.5 for an integer), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (values the caller already checked), as ``dataclasses.replace``."""
        return self.model_copy(update=changes)


class StudentConfig(Section):
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


class LoRAConfig(Section):
    """Low-rank adapters (``peft``) on the backbone; its base weights are then frozen."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class TeacherConfig(Section):
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 3


class HeadShape(Section):
    """The projection head's sizes, shared by the DINO head and iBOT's own patch head."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    # Batch-normalised hidden layers (dinomx.dino_head); the teacher's head then uses batch
    # statistics too, as in DINO.
    use_bn: bool = False


class DINOHeadConfig(HeadShape):
    norm_last_layer: bool = True
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    loss_weight: float = 1.0
    # KoLeo on the student's global CLS tokens; 0 turns it off.
    koleo_loss_weight: float = 0.0


class IBOTConfig(HeadShape):
    # Masked-patch prediction; a loss_weight of 0 turns iBOT off.
    loss_weight: float = 0.0
    mask_ratio_min_max: Pair = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    # With separate_head the patch tokens get their own head (sized as HeadShape); otherwise the DINO head.
    separate_head: bool = False


class OptimConfig(Section):
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: Pair = (0.9, 0.999)
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    # Block i of n trains at lr * layerwise_decay ** (n - i); 1.0 turns it off.
    layerwise_decay: float = 1.0


class CropsConfig(Section):
    global_crops_size: int = 224
    global_crops_scale: Pair = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: Pair = (0.05, 0.32)
    # DINO-LG: masks laid out like the training data (non-zero = annotated); each local crop is
    # centred on an annotated pixel with this probability.
    label_masks_root: str | None = None
    label_guided_probability: float = 0.5


class DatasetConfig(Section):
    # Normalisation statistics travel with the saved backbone's image processor.
    mean: Floats = (0.485, 0.456, 0.406)
    std: Floats = (0.229, 0.224, 0.225)
    # Photometric table: natural images (colour or greyscale), radiology (CT) or H&E histology
    # (dinomx.augmentations).
    augmentation: Literal["rgb", "gray", "ct", "he"] = "rgb"
    num_workers: int = 0
    # Streaming from shards (dinomx.stream): shards each reader interleaves, and the samples it
    # shuffles among. A shard is one slide or series, so several open at once mix slides; the
    # buffer holds encoded tiles (about 1000 x 100 kB per reader at the defaults).
    open_shards: int = Field(default=4, ge=1)
    shuffle_buffer: int = Field(default=1000, ge=1)
    # The image of a sample that trains (e.g. "10x.png"); empty: the one the shard index names.
    shard_image: str = ""
    # Each shard's bytes checked against its index's md5 before its samples train (once per
    # reader process): "stop" names a damaged shard and ends the run, "skip" leaves it out with a
    # warning (a resumed run then no longer continues the exact sample order), "off" trusts it.
    verify_shards: Literal["stop", "skip", "off"] = "stop"


class DistillationConfig(Section):
    # Frozen teachers (local save_pretrained directories or "hf:<repo id>"); empty turns it off.
    # Registered models (models:/name/version) are resolved to directories by the MLflow entry point.
    teachers: list[str] = Field(default_factory=list)
    loss_weight: float = 1.0
    # Magnification-Aware Distillation: a folder laid out like the training data that holds, at
    # the same relative paths, the aligned low-magnification tiles the teachers see.
    paired_root: str | None = None


class DistributionConfig(Section):
    # Processes come from `accelerate launch` (one per GPU, or --cpu with gloo); this section
    # says how they cooperate.
    # ddp replicates the model on every process; fsdp shards parameters, gradients and optimizer
    # state of student and teacher over them (FSDP2), for backbones too large to replicate.
    type: Literal["ddp", "fsdp"] = "ddp"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"


class TrainConfig(Section):
    batch_size: int = 64
    epochs: int = 100
    # One "epoch" is a fixed number of iterations, as in DINOv2's OFFICIAL_EPOCH_LENGTH, so that
    # schedules do not change meaning with the dataset size.
    steps_per_epoch: int = 1250
    seed: int = 0
    log_every: int = 10
    # Off a terminal (a log file, a Slurm job, MLflow's captured output) there is no live bar: a
    # short line with step, rate and time left every N seconds instead, so a slow run is never
    # silent between log steps; 0 turns it off.
    progress_every_seconds: float = 30.0
    # Multi-expert training: N students, each on its own shard of the data, aggregated by the
    # EMA teacher (memory grows with N).
    num_experts: int = 1
    # A resumable checkpoint every N iterations and every M minutes of training (and at the end);
    # 0 turns either off. By time by default: a killed or preempted job loses minutes, not the run.
    checkpoint_every: int = 0
    checkpoint_every_minutes: float = 10.0
    # Online kNN accuracy of the teacher every N iterations, given a labelled evaluation split
    # (dinomx.online_eval); 0 turns it off. eval_images caps the bank and the queries each.
    eval_every: int = 0
    eval_images: int = 1000
    # Stop (instead of only warning) when the diagnostics say the representation collapsed.
    stop_on_collapse: bool = False
    output_dir: str = "outputs/pretrain"


class DinoMXConfig(Section):
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    dino_head: DINOHeadConfig = Field(default_factory=DINOHeadConfig)
    ibot: IBOTConfig = Field(default_factory=IBOTConfig)
    lora_config: LoRAConfig = Field(default_factory=LoRAConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    crops: CropsConfig = Field(default_factory=CropsConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distribution: DistributionConfig = Field(default_factory=DistributionConfig)

    @model_validator(mode="after")
    def _semantics(self) -> "DinoMXConfig":
        _check_semantics(self)
        if self.student.pretrained == "scratch":  # else checked once the backbone's sizes are known
            check_model_fit(self)
        return self

    @property
    def total_steps(self) -> int:
        return self.train.epochs * self.train.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return _plain(self.model_dump())

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
    def from_dict(cls, data: Any, source: str = "config", overrides: dict[str, str] | None = None) -> "DinoMXConfig":
        """``overrides``: dotted key -> the ``section.key=value`` that set it, so that an error in
        one is blamed on it rather than on the file."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            keypath, problem = _first_error(exc)
            if keypath in (overrides or {}):
                raise ConfigError(f"{source}: override {overrides[keypath]!r}: {problem}") from None
            raise ConfigError(f"{source}: {keypath + ': ' if keypath else ''}{problem}") from None

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
        applied = {_apply_override(data, item, str(path)): item for item in overrides or []}
        return cls.from_dict(data, str(path), applied)


def _apply_override(data: dict, item: str, source: str) -> str:
    """Apply one ``section.key=value`` override, the value parsed as YAML (``true``, ``[1, 2]``)
    or as a Python number (``5e-4`` and ``.5``, which YAML 1.1 reads as text); returns its key."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: override {item!r} must look like section.key=value")
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: {parts[0]}: expected a mapping, got {type(section).__name__}")
    section[parts[1]] = _number(yaml.safe_load(raw))
    return ".".join(parts)


def _number(value: Any) -> Any:
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                continue
    return value


# pydantic's error types, said as this project says them.
_EXPECTED = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping",
    "dict_type": "a mapping",
}


def _first_error(exc: ValidationError) -> tuple[str, str]:
    """The dotted key of a validation's first problem ("" for a rule across keys, whose message
    names them) and what was expected there."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        where, key = loc[:-1], loc[-1]
        model = DinoMXConfig
        for part in where:
            model = model.model_fields[part].annotation
        return ".".join(where), f"unknown key {key!r} (expected one of: {', '.join(sorted(model.model_fields))})"
    keypath = ".".join(loc)
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), ConfigError):
        return keypath, str(error["ctx"]["error"])
    if kind == "literal_error":
        return keypath, f"expected one of {error['ctx']['expected']}, got {given!r}"
    if kind in _EXPECTED:
        return keypath, f"expected {_EXPECTED[kind]}, got {given!r}"
    return keypath, f"{error['msg']}, got {given!r}"


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
                       "train.checkpoint_every_minutes": cfg.train.checkpoint_every_minutes,
                       "train.progress_every_seconds": cfg.train.progress_every_seconds,
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
