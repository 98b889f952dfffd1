"""Engine speed on CPU (same as `pararnn bench`): see pararnn/bench.py."""
from pararnn.bench import main

if __name__ == "__main__":
    main()
