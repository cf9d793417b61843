"""Shared core of the PRAG engine: errors, atomic file I/O, the prompt format, the fixture model and the CLI.

The pipeline itself lives in the top-level packages that follow the data flow:
``retrieval`` (corpus -> index), ``offline_encode`` (augment -> encode -> store) and
``engine`` (merge -> serve -> evaluate).
"""

__version__ = "0.1.0"
