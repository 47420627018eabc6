"""The job contract: the one message a remote backend sends to the payload entry.

The launcher builds a `RemoteJob` once from its JobSpec (`executors.base.remote_job`);
the container reads it once (`payload.entry`). It is plain JSON, versioned, and holds
everything the container needs to start torchrun the way every other backend does:

    {"version": 1, "run_id": "...", "config": {...}, "storage_uri": "s3://...",
     "env": {...}, "nodes": 2, "procs_per_node": 8, "cluster": "modal",
     "volume_mounts": {"ferry-runs": "/vol/ferry-runs"}, "workdir": "/tmp/ferry/<id>",
     "stop_grace_s": 120, "master_port": 29500, "hosts": []}

Secrets are never part of it. A backend injects them as environment variables by name
(Modal secrets, SkyPilot secrets, a Ray runtime env); the job refuses an `env` entry
whose name says it holds one, and `check_no_secret_values` refuses a job in which the
value of any of the launching machine's secret variables appears anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from payload.errors import FerryError

VERSION = 1
REMOTE_ROOT = "/ferry"  # container paths the launcher writes: /ferry/inputs/..., /ferry/work
MASTER_PORT = 29500  # torchrun's rendezvous port on the first node, unless the job says
DEFAULT_STOP_GRACE_S = 120
CLUSTERS = ("single", "static", "modal", "skypilot", "ray")  # ray: Ray Train places the ranks
# Words in a variable's name that say it holds a credential (HF_TOKEN, WANDB_API_KEY,
# AWS_SECRET_ACCESS_KEY, ...): such values travel as the backend's secrets, by name.
_SECRET_WORDS = frozenset(
    {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
)
_KEY_QUALIFIERS = frozenset({"API", "ACCESS", "PRIVATE", "SECRET", "ENCRYPTION", "SIGNING"})
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") say nothing about a leak


def secret_like(name: str) -> bool:
    """Does an environment variable's name say it holds a credential? By whole words:
    HF_TOKEN does, TOKENIZERS_PARALLELISM does not."""
    words = name.upper().split("_")
    if _SECRET_WORDS.intersection(words):
        return True
    return any(w == "KEY" and i and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words))


def reroot(value: Any, root: str) -> Any:
    """`value` (a config, a path) with the paths the launcher wrote under REMOTE_ROOT (the
    shipped inputs, the working folder) moved under `root`; a reward function's
    `/ferry/inputs/code-0/file.py:name` too. A user's own /ferry/... path is left alone."""
    if isinstance(value, str):
        for prefix in (f"{REMOTE_ROOT}/inputs", f"{REMOTE_ROOT}/work"):
            if value == prefix or value.startswith((prefix + "/", prefix + ":")):
                return root + value[len(REMOTE_ROOT) :]
        return value
    if isinstance(value, dict):
        return {k: reroot(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [reroot(v, root) for v in value]
    return value


def default_workdir(run_id: str) -> str:
    """Where a container keeps the run's config and local output (storage is the
    durable copy)."""
    return f"/tmp/ferry/{run_id}"


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "config": (dict,),
    "storage_uri": (str, type(None)),
    "env": (dict,),
    "nodes": (int,),
    "procs_per_node": (int,),
    "cluster": (str,),
    "hosts": (list,),
    "volume_mounts": (dict,),
    "workdir": (str,),
    "stop_grace_s": (int,),
    "master_port": (int,),
    "version": (int,),
}


def _strings(value: Any) -> Any:
    """Every string in a JSON-like value, keys included, as it is (not JSON-escaped)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


@dataclass(frozen=True)
class RemoteJob:
    """One run as a remote container starts it. `config` is resolved, with paths as
    they are inside the container; `env` is extra, non-secret environment."""

    run_id: str
    config: dict[str, Any]
    storage_uri: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1
    procs_per_node: int = 1
    cluster: str = "single"  # how a node finds its rank and the first node: CLUSTERS
    hosts: list[str] = field(default_factory=list)  # a static cluster's nodes, rank order
    volume_mounts: dict[str, str] = field(default_factory=dict)  # volume name -> mount path
    workdir: str = ""  # default: default_workdir(run_id)
    stop_grace_s: int = DEFAULT_STOP_GRACE_S  # save-and-upload time after a stop signal
    master_port: int = MASTER_PORT
    version: int = VERSION

    def __post_init__(self) -> None:
        wrong = [
            f"{name} should be {' or '.join(t.__name__ for t in kinds)}, "
            f"not {type(getattr(self, name)).__name__}"
            for name, kinds in _FIELD_TYPES.items()
            if not isinstance(getattr(self, name), kinds) or isinstance(getattr(self, name), bool)
        ]
        if wrong:
            raise FerryError(
                f"Job {self.run_id!r} is not valid:\n" + "\n".join(f"  - {w}" for w in wrong)
            )
        problems = []
        if self.version != VERSION:
            problems.append(
                f"version {self.version}: this payload reads job version {VERSION}; "
                "the launcher and the image are out of step"
            )
        if not self.run_id:
            problems.append("run_id is empty")
        if self.nodes < 1 or self.procs_per_node < 1:
            problems.append("a job needs at least one node and one process per node")
        if self.cluster not in CLUSTERS:
            problems.append(f"cluster {self.cluster!r}: expected one of {', '.join(CLUSTERS)}")
        if self.cluster == "static" and len(self.hosts) != self.nodes:
            problems.append(f"a static cluster of {self.nodes} nodes needs {self.nodes} hosts")
        if self.stop_grace_s < 0:
            problems.append("stop_grace_s must not be negative")
        named = sorted(name for name in self.env if secret_like(name))
        if named:
            problems.append(
                f"env {', '.join(named)}: looks like a credential; pass it as a secret "
                "by name (--secret NAME), never as a value in the job"
            )
        bad = sorted(k for k, v in self.env.items() if not isinstance(v, str))
        if bad:
            problems.append(f"env {', '.join(bad)}: values must be strings")
        if problems:
            raise FerryError(
                f"Job {self.run_id or '?'} is not valid:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        if not self.workdir:
            object.__setattr__(self, "workdir", default_workdir(self.run_id))

    def rooted(self, root: str) -> RemoteJob:
        """This job with its container paths (REMOTE_ROOT/...: the shipped inputs, the
        working folder) under `root` instead: a backend whose nodes get the job's files
        in a folder of their own (SkyPilot's file mount) runs it from there."""
        base = root.rstrip("/")
        config = reroot(self.config, base)
        return replace(self, config=config, workdir=reroot(self.workdir, base))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RemoteJob:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise FerryError(f"The job is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise FerryError("The job is not a JSON object.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FerryError(
                f"The job has fields this payload does not know: {', '.join(unknown)} "
                "(is the image older than the launcher?)."
            )
        return cls(**data)

    def check_no_secret_values(self, environ: Mapping[str, str]) -> None:
        """Refuse the job if the value of any secret-named variable in `environ` (the
        launching machine's environment) appears anywhere in it. Names the variable,
        never the value."""
        secrets = {
            name: value
            for name, value in environ.items()
            if secret_like(name) and len(value) >= _MIN_SECRET_LEN
        }
        if not secrets:
            return
        texts = list(_strings(asdict(self)))
        leaked = sorted(
            name for name, value in secrets.items() if any(value in text for text in texts)
        )
        if leaked:
            raise FerryError(
                f"The value of {', '.join(leaked)} appears in run {self.run_id}'s job (in its "
                "config or env); a credential must never travel in a job.",
                hint="Remove it from the config and pass it as a secret by name (--secret NAME).",
            )
