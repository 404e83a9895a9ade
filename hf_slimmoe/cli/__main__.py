"""`python -m hf_slimmoe.cli ...` (and `torchrun -m hf_slimmoe.cli ...`)."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
