"""``python -m trio_sign.ops``: render deployment policies and size the enclave."""

import sys

from ._main import main

sys.exit(main())
