"""The extraction's own error: a fault that would fail every clip, as opposed to one bad clip (which is listed and
skipped). Its message names the file or option at fault and the fix; the command line prints it as one line and
exits with status 2, so the application never needs the command line's error type."""


class ExtractError(Exception):
    """A bad option, a damaged checkpoint, an output folder that cannot be written, a full disk: found before any
    work where it can be, else it stops the run with what was written complete."""
