"""python -m diffusion.scaling sweep|fit|predict ..."""
from .cli import main

if __name__ == "__main__":
    main()
