"""The one place this package imports the noise schedule (it is being moved into a package)."""
from __future__ import annotations

from ..schedule import build_train_scheduler, training_target

__all__ = ["build_train_scheduler", "training_target"]
