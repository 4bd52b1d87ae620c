"""One error type for bad input: its message names the problem and the fix; the CLI prints it and exits 2."""


class CatchtagError(Exception):
    """A user-facing error (bad model name, empty text, wrong file format, ...)."""
