import sys

from llmtally.cli import main

sys.exit(main())
