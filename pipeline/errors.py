"""The one error type for user mistakes."""


class FusionError(Exception):
    """A problem with the user's input (files, params, adapters), reported as one line.

    The command line prints ``error: <message>`` and exits non-zero; it never shows a traceback
    for this type.
    """
