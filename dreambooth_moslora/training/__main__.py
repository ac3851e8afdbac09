"""python -m dreambooth_moslora.training: the trainer, exactly as train_dreambooth.py (which is this, for a
checkout)."""

import sys

from .loop import main

sys.exit(main())
