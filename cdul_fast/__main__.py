"""``python -m cdul_fast``: the same CLI as ``cdul-fast``, so ``torchrun -m cdul_fast label ...`` works."""

import sys

from .cli import main

sys.exit(main())
