"""Train DINO-MX without any tracking server, on one process or many:

    python -m dinomx.cli --config configs/demo.yaml --data data/demo/images/train --eval-data data/demo/images/val
    accelerate launch --multi_gpu --num_processes 8 -m dinomx.cli --config c.yaml --data tiles/
    torchrun --nproc_per_node 2 -m dinomx.cli ...     # CPU-only machines: DDP over gloo
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

from dinomx.config import DinoMXConfig
from dinomx.errors import run_command
from dinomx.interrupt import Interrupted, exit_code
from dinomx.online_eval import verdict_sentence
from dinomx.train import make_accelerator, train
from dinomx.validation_gate import check_validated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="image folder: <root>/<class>/<image>")
    parser.add_argument("--eval-data", default=None, help="labelled split (<root>/<class>/<image>, the classes of "
                        "--data) for the online kNN accuracy every train.eval_every iterations")
    parser.add_argument("--overrides", default="", help='space-separated section.key=value, e.g. "train.epochs=2"')
    parser.add_argument("--resume-from", default=None, help="checkpoint file or the output_dir holding it")
    parser.add_argument("--skip-validation-gate", action="store_true",
                        help="train although the data's validation report (validation/report.json beside it) failed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def run() -> None:
        report = check_validated(args.data, skip=args.skip_validation_gate)
        if args.skip_validation_gate and report:
            logging.getLogger(__name__).warning("validation gate skipped: training on %s whatever %s says", args.data, report)
        cfg = DinoMXConfig.from_yaml(args.config, shlex.split(args.overrides))
        accelerator = make_accelerator(cfg)
        if accelerator.is_main_process:
            logging.getLogger(__name__).info("%d process(es), %s, mixed precision %s",
                                             accelerator.num_processes, accelerator.distributed_type, accelerator.mixed_precision)
        result = train(cfg, args.data, accelerator=accelerator, resume_from=args.resume_from, eval_root=args.eval_data)
        if accelerator.is_main_process:
            print(f"saved {result.backbone_dir} (checkpoint {result.checkpoint})")
            if result.knn_before is not None and "knn_top1" in result.metrics:
                print(verdict_sentence(result.knn_before, result.metrics["knn_top1"]))
            else:
                print("learning not measured: give --eval-data (and train.eval_every > 0) for the online kNN verdict")

    try:
        return run_command("dinomx", run)
    except Interrupted as exc:
        print(f"dinomx: interrupted by {exc}", file=sys.stderr)
        return exit_code(exc)

if __name__ == "__main__":
    sys.exit(main())
