"""The one exception type users see as a message instead of a traceback."""


class SlimctlError(Exception):
    """Bad input from the user: a config, a checkpoint, a data folder, a flag.

    The CLI prints the message on stderr and exits with code 2. The message says what was
    wrong and how to fix it, in one or two lines.
    """
