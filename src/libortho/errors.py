"""LibOrtho's exceptions: each message says what was wrong and what is expected."""


class LibOrthoError(ValueError):
    """A model, config or input LibOrtho cannot work with."""


class SaveFormatError(LibOrthoError):
    """A directory that is not a valid LibOrtho save (missing, truncated, corrupted, foreign, newer)."""
