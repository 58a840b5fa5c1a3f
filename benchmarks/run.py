"""Benchmark moelm against transformers side by side; see `python benchmarks/run.py --help` and docs/benchmarks.md."""
import sys

from moelm.bench import main

if __name__ == "__main__":
    sys.exit(main())
