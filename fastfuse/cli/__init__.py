"""The command line (``fastfuse``): people's entry point. Nothing else in the package imports it."""

from fastfuse.cli.main import main

__all__ = ["main"]
