"""``python -m cdul_fast``: the same CLI as ``cdul-fast``, so ``torchrun -m cdul_fast label ...`` works."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (pkgutil walks, docs tools) runs nothing
    sys.exit(main())
