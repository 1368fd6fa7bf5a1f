"""Evaluation commands: `python -m diffusion.evaluate COMMAND ...`.

Each command is a module here exposing `add_arguments(parser)` and `run(args)`.
"""
COMMANDS: dict[str, str] = {
    "shapes-accuracy": "diffusion.evaluate.shapes_accuracy",
    "classifier": "diffusion.evaluate.classifier",
    "clip": "diffusion.evaluate.clip",
    "inpaint": "diffusion.evaluate.inpaint",
    "fid": "diffusion.evaluate.fid",
    "upsample": "diffusion.evaluate.upsample",
    "train-extractor": "diffusion.evaluate.train_extractor",
}
