"""Train a model: `python train.py CONFIG [dotted.key=value ...] [--resume auto|PATH | --overwrite]`.

Runs on CPU, one GPU, or many with `accelerate launch train.py ...`.

CPU threads: one per core, waiting passively; OMP_NUM_THREADS and OMP_WAIT_POLICY override (docs/training.md).

A new run in an output_dir that already holds one is refused unless --resume continues it or
--overwrite moves it aside (to OUTPUT_DIR.previous-N) first.

Exit status: 0 when the run reached train.max_steps; 2 for bad input (one line says what); 3 when
training diverged (non-finite or spiking loss); 129, 130 or 143 when SIGHUP (its terminal closed),
Ctrl-C or SIGTERM stopped it after saving a checkpoint (128 + the signal number).
"""
from __future__ import annotations

import argparse

from diffusion.cli.args import Parser, add_trust_argument, apply_trust
from diffusion.cli.help_format import DefaultsHelpFormatter
from diffusion.config import load_config
from diffusion.errors import exit_on_user_error
from diffusion.threads import prefer_passive_waits, set_cpu_threads


def build_parser() -> argparse.ArgumentParser:
    """train.py's arguments (parse them with `parse_intermixed_args`: overrides may follow --resume)."""
    parser = Parser(prog="train.py", description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.max_steps=200 output_dir=runs/try")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint of output_dir, if any) or a checkpoint directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an output_dir that holds one, after moving that run to OUTPUT_DIR.previous-N")
    add_trust_argument(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)
    args = build_parser().parse_intermixed_args(argv)
    apply_trust(args)
    from diffusion.checkpoints.diffusers_folder import fill_from_pretrained  # torch-free until a folder is read

    cfg = load_config(args.config, args.overrides, prepare=fill_from_pretrained)

    from diffusion.training.preflight import preflight

    preflight(cfg, args.resume, args.overwrite)  # the cheap checks, before the slow imports below (Trainer repeats them)
    set_cpu_threads()
    from diffusion.training.trainer import train

    train(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
