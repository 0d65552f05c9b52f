"""The student/teacher pair: backbone + DINO head (+ iBOT head),
built from the config, with its optimiser parameter groups and FSDP2 sharding."""
from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dinomx.backbone import Backbone, layer_depth
from dinomx.config import DinoMXConfig
from dinomx.dino_head import DINOHead

# A transformer block module: Dinov2 `encoder.layer.3`, ViT `layers.3`.
_BLOCK_MODULE = re.compile(r"(?:^|\.)layers?\.\d+$")
_NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "register_tokens", "position_embeddings")


class DINOModel(nn.Module):
    """Backbone + DINO head (+ iBOT head, possibly the same module). One forward per training
    step so that DDP sees every pass."""

    def __init__(self, backbone: Backbone, dino_head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mask_input: bool = True,
        heads: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``masks`` (N, P) selects the patches whose iBOT logits are returned; with
        ``mask_input`` they are also hidden from the backbone (student), otherwise seen (teacher).
        Without ``heads`` only the CLS embeddings (what is exported) are computed."""
        cls, patches = self.backbone(global_crops, masks if mask_input and masks is not None else None)
        if not heads:
            return {"global_cls": cls}
        out = {"global_cls": cls, "global_logits": self.dino_head(cls)}
        if masks is not None and self.ibot_head is not None:
            out["masked_patch_logits"] = self.ibot_head(patches[masks])
        if local_crops is not None:
            out["local_logits"] = self.dino_head(self.backbone(local_crops)[0])
        return out


def _head(in_dim: int, section, norm_last_layer: bool = True) -> DINOHead:
    return DINOHead(in_dim, section.out_dim, section.hidden_dim, section.bottleneck_dim, section.nlayers,
                    norm_last_layer, section.use_bn)


def build_models(cfg: DinoMXConfig) -> tuple[DINOModel, DINOModel]:
    backbone = Backbone.from_config(cfg.student)
    # Adapters and freezing go in before the teacher is copied, so teacher and student have the
    # same parameters and the EMA pairs them one to one (frozen ones stay equal).
    if cfg.lora_config.enabled:
        backbone.add_lora(cfg.lora_config)
    backbone.freeze_blocks(cfg.student.freeze_blocks)
    if cfg.ibot.loss_weight == 0:
        for name, param in backbone.named_parameters():
            if name.endswith("mask_token"):
                param.requires_grad = False  # only masked crops (iBOT) use it
    dino_head = _head(backbone.embed_dim, cfg.dino_head, cfg.dino_head.norm_last_layer)
    ibot_head = None
    if cfg.ibot.loss_weight > 0:
        ibot_head = _head(backbone.embed_dim, cfg.ibot, cfg.dino_head.norm_last_layer) if cfg.ibot.separate_head else dino_head
    student = DINOModel(backbone, dino_head, ibot_head)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    # A batch-normalised head normalises with the batch's statistics in the teacher too (DINO
    # never puts its teacher in eval mode); running averages were never EMA'd, so unusable.
    for head in (teacher.dino_head, teacher.ibot_head):
        if head is not None and any(isinstance(m, nn.BatchNorm1d) for m in head.modules()):
            head.train()
    return student, teacher


def share_frozen(student: DINOModel, teacher: DINOModel) -> int:
    """Point the teacher's copies of the student's frozen weights (the base weights under LoRA,
    frozen blocks) at the student's own tensors, and return how many elements that saves.

    The EMA leaves a frozen weight where it is, so the teacher's copy is the student's value: one
    tensor serves both, and with LoRA on a large backbone that is most of the teacher's memory.
    Not under FSDP, which shards each model's parameters separately."""
    saved = 0
    for (name, t_param), (s_name, s_param) in zip(list(teacher.named_parameters()), list(student.named_parameters())):
        if name != s_name or s_param.requires_grad or t_param.shape != s_param.shape:
            continue
        module_name, _, attr = name.rpartition(".")
        module = teacher.get_submodule(module_name) if module_name else teacher
        module._parameters[attr] = s_param
        saved += s_param.numel()
    return saved


def ema_pairs(teacher: torch.nn.Module, student: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher, student) parameters the EMA moves: those the student trains. A frozen pair stays
    exactly equal (m x + (1 - m) x would drift it by rounding, in both models where they share it)."""
    pairs = [(t, s) for t, s in zip(teacher.parameters(), student.parameters()) if s.requires_grad]
    return [t for t, _ in pairs], [s for _, s in pairs]


def param_groups(model: DINOModel, layerwise_decay: float) -> list[dict]:
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    num_layers = model.backbone.model.config.num_hidden_layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases, norms and tokens are not decayed; the prototype layer has its own lr schedule.
        decay = param.ndim > 1 and not name.endswith(_NO_DECAY_SUFFIXES)
        depth = layer_depth(name, num_layers) if name.startswith("backbone.") else num_layers + 1
        lr_scale = layerwise_decay ** (num_layers + 1 - depth)
        groups.setdefault((decay, "last_layer" in name, lr_scale), []).append(param)
    return [
        {"params": params, "apply_wd": decay, "is_last_layer": last, "lr_scale": scale, "weight_decay": 0.0}
        for (decay, last, scale), params in groups.items()
    ]


def shard(model: DINOModel, mesh) -> None:
    """FSDP2: each transformer block is its own unit, the rest belongs to the root."""
    for name, module in model.named_modules():
        if _BLOCK_MODULE.search(name):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each process's own shard of (possibly FSDP-sharded) parameters."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter. Under FSDP
    each process averages its own shards: student and teacher are sharded alike."""
    teacher_local = local_tensors(teacher_params)
    torch._foreach_mul_(teacher_local, momentum)
    torch._foreach_add_(teacher_local, [p.detach() for p in local_tensors(student_params)], alpha=1 - momentum)
