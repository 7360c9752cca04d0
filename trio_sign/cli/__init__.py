"""The ``trio-sign`` command line (DESIGN §8)."""

from ._main import main as main

__all__ = ["main"]
