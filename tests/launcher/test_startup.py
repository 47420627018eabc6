"""`launch validate` starts fast because it loads only the config code: the run machinery
(launcher.runs, executors, the registry, the storage package) is imported by the
commands that use it. These tests keep it that way, and check that what moved behind a
lazy import still works when it is needed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import QUICKSTART, ROOT

from launcher import api, runs
from payload.config import ConfigError, validate_mapping

# Modules `launch validate` has no use for; each costs start-up time (executors and the
# storage package ~20 ms with the transfer code, the registry sqlite3).
NOT_FOR_VALIDATE = (
    "executors",
    "launcher.runs",
    "launcher.registry",
    "launcher.launch_settings",
    "payload.storage",
    "sqlite3",
)


def _modules_after(*argv: str) -> tuple[int, set[str]]:
    """Run the CLI in a fresh interpreter; its exit code and the modules it imported."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.argv = ["launch", *{list(argv)!r}]
        from launcher.cli import main
        try:
            main()
        except SystemExit as e:
            code = e.code
        sys.stderr.write("MODULES " + json.dumps([code, sorted(sys.modules)]) + "\\n")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    line = next(x for x in result.stderr.splitlines() if x.startswith("MODULES "))
    code, modules = json.loads(line.removeprefix("MODULES "))
    return code, set(modules)


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(f"{name}.") for m in modules)


def test_validate_loads_only_the_config_code():
    """If this fails, a module-level import brought the run machinery back onto the
    `launch validate` path (see launcher/api.py, launcher/output.py, payload/config), or
    pydantic's models: after its first run (which builds them, to compile TrainConfig
    into $FERRY_HOME/cache), `launch validate` checks a config without them."""
    code, first = _modules_after("validate", str(QUICKSTART))
    assert code == 0 and "payload.config.schema" in first
    code, modules = _modules_after("validate", str(QUICKSTART))
    assert code == 0
    assert "payload.config.compiled" in modules and "payload.config.rules" in modules
    assert "payload.config.schema" not in modules and "pydantic.main" not in modules
    assert [m for m in NOT_FOR_VALIDATE if _loaded(modules, m)] == []


def test_dry_run_still_loads_the_run_machinery():
    """The other half of the bargain: a command that needs runs and executors gets them
    (if this fails, the test above proves nothing about a real run)."""
    code, modules = _modules_after("train", str(QUICKSTART), "--dry-run")
    assert code == 0
    assert _loaded(modules, "executors") and _loaded(modules, "launcher.runs")


@pytest.mark.parametrize("name", sorted(api._FROM_RUNS))
def test_api_names_from_runs_are_the_runs_functions(name):
    """`api.prepare` and the rest load launcher.runs on first use; if this fails, a name
    the API promises is missing or is not the function launcher.runs defines."""
    assert getattr(api, name) is getattr(runs, name)


def test_an_unknown_api_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'prepair'"):
        api.prepair  # noqa: B018 - the lookup is the test


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        ({"storage": "s3:///runs"}, "storage", "`s3:///runs` names no bucket."),
        (
            {"resume_from_checkpoint": "volume://"},
            "resume_from_checkpoint",
            "`volume://` names no volume name.",
        ),
        (
            {"datasets": [{"path": "s3:///data.jsonl", "type": "alpaca"}]},
            "datasets[0].path",
            "`s3:///data.jsonl` names no bucket.",
        ),
    ],
)
def test_storage_uris_are_still_checked(config, key, message):
    """The storage code is imported only for a config that names a URI; if this fails,
    a bad URI is no longer reported (the lazy import skipped the check)."""
    raw = {"base_model": "org/model", "learning_rate": 1e-4, "datasets": [{"path": "org/d"}]}
    with pytest.raises(ConfigError) as info:
        validate_mapping({**raw, **config}, resolve_paths=True)
    assert (key, message) in {(p.key, p.message) for p in info.value.problems}
