"""The one error type users see: bad input, reported as a single line with exit status 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (a data row, a config key, a path).

    Rendered as ``path:line: field 'name' message``; any part that is unknown is
    left out. The CLI prints it alone on stderr and exits with status 2.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        what = f"field '{self.field}' " if self.field is not None else ""
        return f"{where}{what}{self.message}"


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; carries the step and last good checkpoint."""
