"""``python -m ddpm`` (also what ``torchrun -m ddpm`` runs)."""

import sys

from .cli import main

sys.exit(main())
