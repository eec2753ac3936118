"""``python -m onecomp``: the ``onecomp`` command, also as ``torchrun … -m onecomp run CONFIG``."""

import sys

from .cli import main

sys.exit(main())
