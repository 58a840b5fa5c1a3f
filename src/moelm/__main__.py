"""python -m moelm (and torchrun -m moelm): the moelm command line."""
import sys

from .cli import main

sys.exit(main())
