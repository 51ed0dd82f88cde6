"""The ``engram`` command line: :func:`main` dispatches to one thin module per command."""

from engram.cli.main import main

__all__ = ["main"]
