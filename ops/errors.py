"""The one exception type that the command line turns into a one-line message."""


class TunefleetError(Exception):
    """An error the user can act on: what failed, and what to do next.

    The CLI prints it as one line and exits 1; ``--debug`` adds the traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message
