"""``python -m fastfuse`` runs the command-line interface."""

import sys

from fastfuse.cli.main import main

sys.exit(main())
