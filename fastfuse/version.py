"""The package version: one place, read by the package, its file metadata and the CLI."""

__version__ = "0.1.0"
