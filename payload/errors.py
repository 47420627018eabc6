"""The one family of user-facing errors.

Anything the user can fix (a config typo, a missing file, a missing credential) raises a
`FerryError`. The CLI prints it as one clear paragraph and exits 1; any other exception
is a bug in Ferry and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

# The payload's exit code after a SIGTERM stop (a preemption): a checkpoint was saved and
# uploaded, and a relaunch of the run resumes from it. 75 is EX_TEMPFAIL: try again later.
EXIT_PREEMPTED = 75
# Anything else that went wrong (a crash, a failed upload): not the user's to fix in the
# config, so backends may try again (Modal's `retries`). 70 is EX_SOFTWARE.
EXIT_FAILED = 70


class FerryError(Exception):
    """A problem the user can fix. `hint` is the next thing to try, if there is one.
    `exit_code` is what the payload exits with when it ends a run (1: never retried)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class TransferError(FerryError):
    """Storage failed mid-run (an upload or a download that failed or stalled), after the
    launch checked it could write there: likely passing, so another attempt may work."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_FAILED):
        super().__init__(message, hint)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the key as the user wrote it, and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(FerryError):
    """Every problem found in one config, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))
