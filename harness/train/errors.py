"""Errors the command line reports in one line. Kept free of torch imports so that
`harness.cli` stays quick to import for commands that never train."""


class RunStopped(Exception):
    """The run cannot go on (too many bad steps); the message says why and what to do."""
