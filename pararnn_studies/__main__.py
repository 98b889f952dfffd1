"""``python -m pararnn_studies`` = the ``pararnn`` command."""
import sys

from .cli import main

sys.exit(main())
