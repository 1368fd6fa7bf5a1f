"""Sample from a checkpoint: `python sample.py --checkpoint RUN_OR_CHECKPOINT [options]`.

See `python sample.py --help` and docs/sampling.md, docs/guidance.md, docs/inpainting.md and docs/upsampling.md.
"""
from diffusion.cli.sample import main

if __name__ == "__main__":
    main()
