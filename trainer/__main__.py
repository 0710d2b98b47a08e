"""``python -m trainer`` is the same as ``python -m trainer.worker``."""

import sys

from trainer.worker import main

sys.exit(main())
