"""One base class for every error caused by bad input, so the CLI can report it in one line."""


class LegoInterpError(ValueError):
    """Bad input (a sentence, a config, a file): the message names the problem and the fix."""


class UsageError(LegoInterpError):
    """A command line argparse cannot read: an unknown option, a missing argument, a value out of range."""
