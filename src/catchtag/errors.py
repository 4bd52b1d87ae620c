"""One error type for bad input: its message names the problem and the fix; the CLI prints it and exits 2."""


class CatchtagError(Exception):
    """A user-facing error (bad model name, empty text, wrong file format, ...)."""


def check_type(name: str, value, kinds: tuple[type, ...], what: str, example) -> None:
    """Refuse, in one line, a Python argument of the wrong type, before it fails somewhere deep inside as a raw
    TypeError. int and float stand for any whole or real number (numpy's too); a bool is not a number here (True is
    an int to Python, never what a caller means by eps=True)."""
    import numbers

    kinds = tuple({int: numbers.Integral, float: numbers.Real}.get(k, k) for k in kinds)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CatchtagError(f"{name} must be {what}, got {value!r} ({type(value).__name__}). Fix: e.g. "
                            f"{name}={example!r}")
