"""``python -m trio_sign.cli``: the same as the ``trio-sign`` command."""

from ._main import run

run()
