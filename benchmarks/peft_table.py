"""Full fine-tuning vs LoRA vs block freezing: time per step and peak memory (cf. DINO-MX Table 10).

    .venv/bin/python benchmarks/peft_table.py [--steps 20] [--size small] [--rounds 3]

Each variant trains in its own process (peak memory is per process) on generated tiles with the
same backbone, batch and crops. The machine is shared and drifts, so the variants alternate in
rounds (A B C D A B C D ...); every round is printed, and the summary gives each variant's median
and its median ratio to full fine-tuning with the range over rounds. On CUDA the peak is
``torch.cuda.max_memory_allocated``; on CPU it is the process's peak resident set size, and also
that peak less what the process held before training began (torch and its libraries, ~0.5 GB,
the same for every variant): training's own memory, the figure comparable to the paper's.

The memory table says where the bytes go before activations: the student's weights, gradients and
AdamW's two moments for what it trains, and the teacher's own weights (frozen weights are shared
with the student, ``dinomx.model.share_frozen``).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
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
    "LoRA r=8 + checkpointing": ["lora_config.enabled=true", "lora_config.r=8", "student.gradient_checkpointing=true"],
}
SIZES = {
    # ViT-S/16-like width on small crops: fits a CPU run in minutes.
    "small": ["student.hidden_size=384", "student.num_hidden_layers=12", "student.num_attention_heads=6",
              "student.mlp_ratio=4", "student.patch_size=8", "student.image_size=64", "crops.global_crops_size=64",
              "crops.local_crops_size=32", "train.batch_size=16"],
    "tiny": ["student.hidden_size=96", "student.num_hidden_layers=6", "student.num_attention_heads=4",
             "train.batch_size=16"],
}
MIB = 2**20


def child(args) -> None:
    import torch

    from dinomx.config import DinoMXConfig
    from dinomx.train import train

    cfg = DinoMXConfig.from_yaml(args.config, json.loads(args.overrides))
    # What the process holds before training (torch and its libraries): the same for every
    # variant, and not what the paper's GPU figures count.
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stamps = []
    train(cfg, args.data, on_log=lambda step, m: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # the first step (warm-up) excluded
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / MIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s_per_step": per_step, "peak_mib": peak,
                      "training_mib": peak - (0 if torch.cuda.is_available() else start)}))


def breakdown(config: Path, overrides: list[str]) -> dict:
    """Bytes of weights, gradients, optimizer state and the teacher's own weights (fp32)."""
    from dinomx.config import DinoMXConfig
    from dinomx.model import build_models, share_frozen

    student, teacher = build_models(DinoMXConfig.from_yaml(config, overrides))
    share_frozen(student, teacher)
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    shared = {id(p) for p in student.parameters()}
    backbone = list(student.backbone.parameters())
    return {
        "backbone_trainable": sum(p.numel() for p in backbone if p.requires_grad),
        "backbone_total": sum(p.numel() for p in backbone),
        "weights": 4 * sum(p.numel() for p in student.parameters()) / MIB,
        "grads": 4 * trained / MIB,
        "adam": 8 * trained / MIB,
        "teacher": 4 * sum(p.numel() for p in teacher.parameters() if id(p) not in shared) / MIB,
    }


def _median_ratio(values: list[float], base: list[float]) -> str:
    ratios = [v / b for v, b in zip(values, base)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
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

    config = repo / "configs/demo.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "tiles", seed=0, image_size=64 if args.size == "small" else 32,
                        train_per_class=16, val_per_class=1) / "train"
        layers = int(next(o for o in SIZES[args.size] if o.startswith("student.num_hidden_layers")).split("=")[1])
        common = SIZES[args.size] + ["train.epochs=1", f"train.steps_per_epoch={args.steps}", "train.log_every=1",
                                     "train.eval_every=0", "dino_head.out_dim=4096", f"train.output_dir={tmp}/out"]
        overrides = {name: common + [o.format(half=layers // 2) for o in extra] for name, extra in VARIANTS.items()}

        print(f"{'variant':<26}{'backbone trainable':>22}{'weights':>9}{'grads':>8}{'AdamW':>8}{'teacher':>9}   MiB")
        for name, extra in overrides.items():
            b = breakdown(config, extra)
            share = 100 * b["backbone_trainable"] / b["backbone_total"]
            print(f"{name:<26}{b['backbone_trainable']:>13,} ({share:4.1f}%){b['weights']:>9.1f}{b['grads']:>8.1f}"
                  f"{b['adam']:>8.1f}{b['teacher']:>9.1f}")
        print()

        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for round_ in range(args.rounds):
            for name, extra in overrides.items():
                result = subprocess.run(
                    [sys.executable, __file__, "--child", "--config", str(config), "--data", str(data),
                     "--overrides", json.dumps(extra)],
                    capture_output=True, text=True, check=True, cwd=repo,
                )
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                runs[name].append(figures)
                print(f"round {round_ + 1}: {name:<26}{figures['s_per_step']:>8.3f} s/step {figures['peak_mib']:>8.0f} MiB "
                      f"({figures['training_mib']:.0f} MiB over the process before training)")

    base = runs["full fine-tune"]
    print()
    print(f"{'variant':<26}{'s/step':>8}{'peak MiB':>10}{'training':>10}   vs full fine-tune: time, peak, "
          "training's own (median, range over rounds)")
    for name, figures in runs.items():
        times, peaks = [f["s_per_step"] for f in figures], [f["peak_mib"] for f in figures]
        own = [f["training_mib"] for f in figures]
        print(f"{name:<26}{statistics.median(times):>8.3f}{statistics.median(peaks):>10.0f}{statistics.median(own):>10.0f}   "
              f"{_median_ratio(times, [f['s_per_step'] for f in base])}, {_median_ratio(peaks, [f['peak_mib'] for f in base])}, "
              f"{_median_ratio(own, [f['training_mib'] for f in base])}")


if __name__ == "__main__":
    main()
