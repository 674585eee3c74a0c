"""User-facing errors: one line on stderr, no traceback, non-zero exit code."""


class DistillationError(SystemExit):
    """A configuration or input error the user can fix.

    It derives from :class:`SystemExit` so that fairseq's command-line tools
    print just the message (``fairseq-kd: error: ...``) and exit with status 1
    instead of a traceback from deep inside the trainer.  Library code and
    tests can still catch it by type.
    """

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"fairseq-kd: error: {message}")

    def __str__(self) -> str:
        return self.message
