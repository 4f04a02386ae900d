"""The one exception type users see as a one-line message instead of a traceback."""


class NeighbourhoodsError(Exception):
    """A problem with the user's input or workspace; the CLI prints it as `error: <message>`."""
