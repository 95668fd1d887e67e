"""The one exception symattn raises for anything a user can get wrong, and how its messages show values."""

from decimal import Decimal


class SymattnError(ValueError):
    """Bad input or usage: a spec, a file, an option or a request symattn cannot honour.

    >>> from symattn import SymattnError, load_spec
    >>> try:
    ...     load_spec({"q": [[[1]]], "k": [[[1]]], "v": [[[1]]], "causal": "yes"})
    ... except SymattnError as e:
    ...     print(e)
    causal: expected true or false, received 'yes'

    The message names the field, the value expected and the value received.
    """


def printable(text: str) -> str:
    """Control and other non-printable characters escaped (a name never moves a terminal's cursor).

    >>> printable("a\\x1b[2Jb")
    'a\\\\x1b[2Jb'
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value) -> str:
    """A received value as a message shows it: its repr, escaped, and cut short when long."""
    try:
        text = printable(repr(value))
    except ValueError:  # an integer beyond Python's int-string limit, maybe inside a list
        if isinstance(value, int):
            return f"an integer of {len(Decimal(abs(value)).as_tuple().digits)} digits"
        return f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"
