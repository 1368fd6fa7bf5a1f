"""Unpickling data files without running code: only the globals that dicts, lists, strings, numbers
and numpy arrays need are allowed, so a hostile pickle under an untrusted data.root is refused,
never executed."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

# What pickle needs to rebuild numpy arrays (NumPy 1 and 2 module names; protocol 5's buffer form),
# and bytes in protocol-2 pickles written by Python 3. Containers and scalars need no globals.
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class ForbiddenPickle(pickle.UnpicklingError):
    """The pickle asks for a global outside ALLOWED_GLOBALS (e.g. os.system): it is not plain data."""


class DataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise ForbiddenPickle(f"it asks for {module}.{name}, which plain data never needs")
        return super().find_class(module, name)


def load_data_pickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Unpickle a data file (dicts, lists, strings, numbers, numpy arrays) without running code.

    Raises ForbiddenPickle for anything else and pickle.UnpicklingError, EOFError or ValueError for
    damaged files. `encoding` decodes Python 2 strings (CIFAR-10's batches were written by Python 2).
    """
    with open(path, "rb") as handle:
        try:
            return DataUnpickler(handle, encoding=encoding).load()
        except ForbiddenPickle as err:
            raise ForbiddenPickle(f"{path}: {err}") from None
