import sys

from llmtally.cli import main

# Guarded: importing this module (pydoc, tools) must not run the CLI.
if __name__ == "__main__":
    sys.exit(main())
