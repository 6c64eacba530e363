"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a file, a key, a value). The CLI prints its message on one
line to stderr and exits with code 2, without a traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the file, line, field or key at fault."""


def exact_div(a: int, b: int, what: str = "") -> int:
    """a // b, raising a UserError when b does not divide a (lm-human-preferences `exact_div`)."""
    if b <= 0 or a % b != 0:
        raise UserError(f"{what or 'value'}: {a} is not divisible by {b}")
    return a // b
