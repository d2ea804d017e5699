"""The one error the command-line tools report without a traceback."""


class UserError(Exception):
    """A problem with what the user gave (a file, a flag, a checkpoint, a data directory).

    Every command prints it as `PROG: error: MESSAGE` on stderr and exits with status 2; messages name the
    file (and record or line) at fault.
    """
