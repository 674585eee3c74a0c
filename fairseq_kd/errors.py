"""User-facing errors: one line on stderr, no traceback, non-zero exit code."""

import contextlib
import sys
from typing import Iterator


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


@contextlib.contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """The body of a command-line tool: a :class:`DistillationError` or an
    ``OSError`` (disk full, permissions...) ends it with one line
    ``PROG: error: ...`` on stderr and exit status 1, without a traceback."""
    try:
        yield
    except DistillationError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file and the reason
        print(f"{prog}: error: {e.filename or ''}: {e.strerror or e}; fix it and re-run (finished steps are kept)",
              file=sys.stderr)
        sys.exit(1)
