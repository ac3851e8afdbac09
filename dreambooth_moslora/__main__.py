"""python -m dreambooth_moslora: the ``moslora`` command."""

import sys

from .cli import main

sys.exit(main())
