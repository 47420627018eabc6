"""`python -m payload.config.compat DIR [--json]`: how many of a folder's configs Ferry
accepts, and which keys block the others.

Every `*.yml` / `*.yaml` under DIR (recursively) is read and validated as `launch
validate` does it. The report gives the count of valid configs, then a table of the keys
that block the rest, most common first (a config blocked by several keys counts once for
each), then each failing config with its keys. Exit code 0 when every config is valid, 1
otherwise (also for an empty folder, which proves nothing).

Keys are shown as the user wrote them, with list positions dropped (`datasets[2].field`
counts as `datasets[].field`), so that the same key in different configs adds up.

Hub ids are taken as hub ids: the question here is which keys Ferry takes, and
validation never contacts the hub. HF_HUB_OFFLINE=1 (set on offline machines and in the
tests) would otherwise report every `org/model` as unreachable, so it is lifted while the
configs are checked.

Light, like the rest of payload.config: no torch, no transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from payload.config import paths
from payload.config.loader import is_url, read_raw, validate_mapping
from payload.errors import ConfigError, FerryError

# What stands in the table for a problem that names no key: a file that is not valid
# YAML (or not a mapping), and a cross-key rule that names none.
UNREADABLE = "(unreadable file)"
NO_KEY = "(whole config)"
_INDEX = re.compile(r"\[\d+\]")


@dataclass
class ConfigResult:
    """One config: the keys that block it (empty when valid), each problem's text, and
    the warnings of a valid one (settings it would ignore)."""

    path: str
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass
class Report:
    results: list[ConfigResult]

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def valid(self) -> int:
        return sum(r.valid for r in self.results)

    @property
    def percent(self) -> float:
        return 100.0 * self.valid / self.total if self.total else 0.0

    def blockers(self) -> list[tuple[str, int]]:
        """(key, configs it blocks), most first; ties by key name."""
        counts = Counter(key for r in self.results for key in r.keys)
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "valid": self.valid,
            "percent": round(self.percent, 1),
            "blockers": [{"key": k, "configs": n} for k, n in self.blockers()],
            "configs": [
                {
                    "path": r.path,
                    "valid": r.valid,
                    "keys": r.keys,
                    "problems": r.problems,
                    "warnings": r.warnings,
                }
                for r in self.results
            ],
        }


def table_key(key: str) -> str:
    """A problem's key as the table counts it: list positions dropped."""
    return _INDEX.sub("[]", key) if key else NO_KEY


def config_files(folder: Path) -> list[Path]:
    """The YAML files under `folder`, in a stable order."""
    found = [p for p in folder.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file()]
    return sorted(found)


@contextlib.contextmanager
def _hub_ids_as_names() -> Iterator[None]:
    """Lift HF_HUB_OFFLINE=1 for the block (see the module docstring), then put it back."""
    saved = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["HF_HUB_OFFLINE"] = saved


def check_config(path: Path, shown_as: str | None = None) -> ConfigResult:
    """Validate one config as `launch validate` does, without raising."""
    result = ConfigResult(shown_as or str(path))
    try:
        raw = read_raw(path)
        base_dir = None if is_url(path) else path.expanduser().resolve().parent
        validate_mapping(raw, str(path), base_dir=base_dir, warn=result.warnings.append)
    except ConfigError as e:
        for problem in e.problems:
            key = table_key(problem.key)
            if key not in result.keys:
                result.keys.append(key)
            result.problems.append(str(problem))
    except FerryError as e:
        result.keys.append(UNREADABLE)
        result.problems.append(e.message)
    return result


def scan(folder: str | os.PathLike[str]) -> Report:
    """Check every config under `folder`."""
    root = Path(folder)
    if not root.is_dir():
        raise FerryError(f"{folder} is not a folder; give the folder that holds the configs.")
    results = []
    with _hub_ids_as_names(), paths.memoized():
        for path in config_files(root):
            results.append(check_config(path, str(path.relative_to(root))))
    return Report(results)


def render(report: Report) -> str:
    """The report as text: the count, the table of blocking keys, then each failure."""
    lines = [f"{report.valid} of {report.total} configs valid ({report.percent:.1f}%)"]
    blockers = report.blockers()
    if blockers:
        width = max(len("key"), *(len(k) for k, _ in blockers))
        lines += ["", f"{'key':<{width}} | configs blocked", f"{'-' * width}-+-{'-' * 15}"]
        lines += [f"{key:<{width}} | {count}" for key, count in blockers]
        lines += ["", "failing configs:"]
        lines += [f"  {r.path}: {', '.join(r.keys)}" for r in report.results if not r.valid]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m payload.config.compat",
        description="Validate every config in a folder; count them and the keys that block.",
    )
    parser.add_argument("folder", help="folder of *.yml / *.yaml configs (searched recursively)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = scan(args.folder)
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0 if report.total and report.valid == report.total else 1


if __name__ == "__main__":
    sys.exit(main())
