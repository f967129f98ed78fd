"""Diagnostics that ship with the package (``python -m fastcdml <tool>``); not imported by ``import fastcdml``."""
