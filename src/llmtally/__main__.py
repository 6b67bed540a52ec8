import sys

from llmtally.cli import main

# Guarded: `serve` starts its proxy workers with multiprocessing's "spawn", which imports this module again.
if __name__ == "__main__":
    sys.exit(main())
