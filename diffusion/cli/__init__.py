"""Command lines: `sample.py` (`cli.sample`) and the sample.py features it is built from."""
