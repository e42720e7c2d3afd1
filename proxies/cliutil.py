"""How the administration commands (`mailgate queue`, `mailgate quarantine`) report failure:
one `prog: message` line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def report_failures(prog: str, what: str, action: Callable[[], int],
                    expected: tuple[type[Exception], ...]) -> int:
    """Run `action`; turn the `expected` errors (the user's mistakes, the store's own errors)
    and OS errors on `what` (the store's name, for errors without a file name) into a line."""
    try:
        return action()
    except expected as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    except PermissionError as exc:
        print(f"{prog}: permission denied: {exc.filename} (run as the mailgate user or root)",
              file=sys.stderr)
    except OSError as exc:
        print(f"{prog}: {exc.filename or what}: {exc.strerror or exc}", file=sys.stderr)
    return 1
