"""The ``fastskip`` command line: the parser, the commands, the demo, the short
benchmark and the notebook's ``test_prompt`` printout."""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
