"""``python -m pararnn`` = the ``pararnn`` command (:mod:`pararnn_studies.cli`)."""
import sys

from pararnn_studies.cli import main

sys.exit(main())
