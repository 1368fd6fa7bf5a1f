"""`python -m diffusion.ema reconstruct RUN --sigma-rel 0.05,0.10 [--step S] [--out DIR]`: post-hoc EMA
(EDM2) from a run trained with train.posthoc_ema=true; `python -m diffusion.ema raw RUN [--step S]`: a
checkpoint's raw (not averaged) weights, in the same loadable format. The parser is torch-free, so
--help and bad flags answer at once."""
from __future__ import annotations

import sys

from ..cli.args import Parser, add_trust_argument, apply_trust
from ..cli.help_format import DefaultsHelpFormatter
from ..errors import UserError, exit_on_user_error


def positive_int(text: str) -> int:
    """argparse type of --step: a whole number >= 1 (one line otherwise)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a step >= 1, got {value}")
    return value


def build_parser() -> Parser:
    parser = Parser(prog="python -m diffusion.ema", description=__doc__, formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{reconstruct,raw}")
    rec = commands.add_parser("reconstruct", formatter_class=DefaultsHelpFormatter,
                              help="write the EMA of each sigma_rel as a checkpoint (RUN/posthoc/sigma_rel-0.100)",
                              description="Least-squares reconstruction (EDM2's Algorithm 3) of power-function EMAs "
                                          "from the run's snapshots; one checkpoint in RUN/final's format per sigma_rel.")
    rec.add_argument("run", help="the run folder (output_dir) trained with train.posthoc_ema=true")
    rec.add_argument("--sigma-rel", required=True,
                     help="comma-separated relative EMA widths, each in (0, 0.2887), e.g. 0.02,0.05,0.10,0.20")
    rec.add_argument("--step", type=positive_int, default=None,
                     help="reconstruct the EMA as it stood at this snapshot step (default: the last snapshot); an "
                          "early EMA of the run, e.g. as an autoguidance guide")
    rec.add_argument("--out", default=None, help="folder for the checkpoints (default: RUN/posthoc)")
    rec.add_argument("--max-residual", type=float, default=0.25,
                     help="refuse a sigma_rel whose fitted profile misses more than this fraction (L2) of the wanted one")
    rec.add_argument("--no-progress", action="store_true", help="no progress bar")
    raw = commands.add_parser("raw", formatter_class=DefaultsHelpFormatter,
                              help="write a checkpoint's raw weights (no EMA) as a checkpoint (RUN/posthoc/raw-step-N)")
    raw.add_argument("run", help="the run folder (output_dir)")
    raw.add_argument("--step", type=positive_int, default=None, help="the checkpoint's step (default: the newest)")
    raw.add_argument("--out", default=None, help="folder for the checkpoint (default: RUN/posthoc)")
    for sub in (rec, raw):
        sub.error = parser.error  # one line, exit 2 (see diffusion.cli.args.Parser)
        add_trust_argument(sub)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from ..threads import prefer_passive_waits, set_cpu_threads

    prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        raise UserError("name a command: python -m diffusion.ema reconstruct RUN --sigma-rel 0.05,0.10 (or raw RUN)")
    if args.command == "reconstruct":
        if not 0 < args.max_residual <= 1:
            raise UserError(f"--max-residual must be in (0, 1]; got {args.max_residual:g}")
        from .reconstruct import parse_sigma_rels

        sigma_rels = parse_sigma_rels(args.sigma_rel)  # before torch is imported
    apply_trust(args)
    set_cpu_threads()
    from . import reconstruct as rec

    if args.command == "reconstruct":
        paths = rec.reconstruct(args.run, sigma_rels, args.step, args.out, args.max_residual, not args.no_progress)
    else:
        paths = [rec.raw_weights(args.run, args.step, args.out)]
    for line in rec.summary(paths):
        print(line)


if __name__ == "__main__":
    main()
