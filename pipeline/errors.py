"""The one error type for user mistakes."""


class FusionError(Exception):
    """A problem with the user's input (files, params, adapters), reported as one line.

    The command line prints ``error: <message>`` and exits non-zero; it never shows a traceback
    for this type.
    """


def os_error_line(e: OSError) -> str:
    """One line for a file system error met while working (a full disk, a read-only file system):
    the file, the reason, and that the atomic writes left nothing behind."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e} (nothing was written)"
