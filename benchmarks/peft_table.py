"""Full fine-tuning vs LoRA vs block freezing: time per step and peak memory (cf. DINO-MX Table 10).

    .venv/bin/python benchmarks/peft_table.py [--steps 20] [--size small]

Each variant trains in its own process (peak memory is per process) on generated tiles with
the same backbone, batch and crops; figures are printed as a table. On CUDA the peak is
``torch.cuda.max_memory_allocated``; on CPU it is the process's peak resident set size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "full fine-tune": [],
    "LoRA r=8 (q,v)": ["lora_config.enabled=true", "lora_config.r=8"],
    "freeze first half": ["student.freeze_blocks={half}"],
    "LoRA r=8 + freeze half": ["lora_config.enabled=true", "lora_config.r=8", "student.freeze_blocks={half}"],
}
SIZES = {
    # ViT-S/16-like width on small crops: fits a CPU run in minutes.
    "small": ["student.hidden_size=384", "student.num_hidden_layers=12", "student.num_attention_heads=6",
              "student.mlp_ratio=4", "student.patch_size=8", "student.image_size=64", "crops.global_crops_size=64",
              "crops.local_crops_size=32", "train.batch_size=16"],
    "tiny": ["student.hidden_size=96", "student.num_hidden_layers=6", "student.num_attention_heads=4",
             "train.batch_size=16"],
}


def child(args) -> None:
    import torch

    from dinomx.config import DinoMXConfig
    from dinomx.model import build_models
    from dinomx.train import train

    cfg = DinoMXConfig.from_yaml(args.config, json.loads(args.overrides))
    student, _ = build_models(cfg)
    # Backbone parameters, as in the paper's table; the DINO head always trains.
    trainable = sum(p.numel() for p in student.backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.backbone.parameters())
    stamps = []
    train(cfg, args.data, on_log=lambda step, m: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # the first step (warm-up) excluded
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"trainable": trainable, "total": total, "s_per_step": per_step, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "tiles", seed=0, image_size=64 if args.size == "small" else 32,
                        train_per_class=16, val_per_class=1) / "train"
        layers = int(next(o for o in SIZES[args.size] if o.startswith("student.num_hidden_layers")).split("=")[1])
        common = SIZES[args.size] + ["train.epochs=1", f"train.steps_per_epoch={args.steps}", "train.log_every=1",
                                     "dino_head.out_dim=4096", f"train.output_dir={tmp}/out"]
        print(f"{'variant':<24} {'backbone trainable':>20} {'s/step':>8} {'peak MiB':>9}")
        for name, extra in VARIANTS.items():
            overrides = common + [o.format(half=layers // 2) for o in extra]
            result = subprocess.run(
                [sys.executable, __file__, "--child", "--config", str(repo / "configs/demo.yaml"), "--data", str(data),
                 "--overrides", json.dumps(overrides)],
                capture_output=True, text=True, check=True, cwd=repo,
            )
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            share = 100 * figures["trainable"] / figures["total"]
            print(f"{name:<24} {figures['trainable']:>9,} ({share:4.1f}%) {figures['s_per_step']:>8.3f} {figures['peak_mib']:>9.0f}")


if __name__ == "__main__":
    main()
