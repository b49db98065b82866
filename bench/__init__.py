"""bench: a label-efficiency benchmark harness for semantic segmentation."""

__version__ = "0.1.0"


class BenchError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
