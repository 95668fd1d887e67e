"""The one exception symattn raises for anything a user can get wrong."""


class SymattnError(ValueError):
    """Bad input or usage: a spec, a file, an option or a request symattn cannot honour.

    The message names the field, the value expected and the value received.
    """
