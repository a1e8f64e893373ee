"""The package version, in a module of its own so that any layer can record it without importing
the package's public API (and setup.cfg reads it without importing torch)."""

__version__ = "0.1.0"
