"""The function Modal runs: `ferry_train(job_json)`, one call per container of the job.

It is defined here, in the payload, because Modal serializes it by reference
(`payload.entry.modal.ferry_train`) and the image holds `payload/` only.

How it ends decides what Modal does next:
- training done (0) or a user error (1, with the payload's message): it returns
  `{"exit_code", "detail"}`. Modal records a result and never retries it: a config that
  cannot work costs nothing more.
- stopped after a checkpoint (75, a preemption) or anything else (70: a crash, a failed
  upload; or 1 without the payload's message, which is no user error): it raises
  `RunStopped`, so Modal restarts it on the same input (preemption) or retries it
  (`retries`); every restart resumes from the newest complete checkpoint.
The launcher reads the exit code from the value or from the exception's `exit_code`,
never from its text.
"""

from __future__ import annotations

from typing import Any

from payload.errors import EXIT_PREEMPTED


class RunStopped(Exception):  # noqa: N818 - the run stopped; not always an error
    """Training ended with an exit code that asks for another attempt (75: preempted
    after a checkpoint; others: crashed). Pickled back to the launcher by Modal."""

    def __init__(self, exit_code: int, detail: str | None = None):
        super().__init__(exit_code, detail)
        self.exit_code, self.detail = exit_code, detail

    def __str__(self) -> str:
        what = (
            "preempted after a checkpoint"
            if self.exit_code == EXIT_PREEMPTED
            else "training failed"
        )
        return f"{what} (exit code {self.exit_code})" + (f": {self.detail}" if self.detail else "")


def ferry_train(job_json: str) -> dict[str, Any]:
    """Run the RemoteJob `job_json` on this container (see the module docstring)."""
    from payload.entry.remote import run_job
    from payload.runtime.job import RemoteJob

    result = run_job(RemoteJob.from_json(job_json))
    if result.exit_code == 0 or (result.exit_code == 1 and result.detail):
        return result.to_dict()
    detail = result.detail if result.exit_code != EXIT_PREEMPTED else None
    raise RunStopped(result.exit_code, detail)
