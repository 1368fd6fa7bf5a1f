"""Sample from a checkpoint: `python sample.py --checkpoint RUN_OR_CHECKPOINT [options]`.

See `python sample.py --help` and the README for guidance, prompts and in-painting.
"""
from diffusion.cli.sample import main

if __name__ == "__main__":
    main()
