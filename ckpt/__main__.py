"""``python -m ckpt``: the ``ckpt`` command (``ckpt.cli.main``)."""

import sys

from ckpt.cli import main

sys.exit(main())
