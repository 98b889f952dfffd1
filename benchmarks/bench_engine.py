"""Engine speed on CPU (same as `pararnn bench`; options: `pararnn bench --help`): see pararnn/studies/bench.py."""
import sys

from pararnn_studies.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
