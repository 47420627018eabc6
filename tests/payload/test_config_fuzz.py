"""The config fuzzer (bench/fuzz_config.py), bounded: a few hundred seeded mutations of
the shipped configs through validation in-process, and a few through the real CLI. A
failure means some config makes validation raise something other than a clean
FerryError: the user would see a traceback instead of a message naming the key."""

from __future__ import annotations

import importlib.util
import math
import random
import sys

from helpers import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("fuzz_config", ROOT / "bench" / "fuzz_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_config"] = module
    spec.loader.exec_module(module)
    return module


def test_seeded_mutations_never_crash():
    result = _bench().run(n=400, seed=15, cli=4)
    assert dict(result["classes"]) == {}
    assert result["counts"]["crash"] == 0
    assert result["cli"]["crash"] == 0
    # The generator reaches both outcomes: it is not only feeding garbage.
    assert result["counts"]["error"] > 300
    assert result["counts"]["accepted"] > 0
    assert sum(result["cli"].values()) >= 3


def test_known_crash_classes_are_clean_errors():
    """The three classes the issue found: over-long path, NUL byte, and (found by the
    fuzzer) a sweep value of inf in a trial name."""
    from launcher.sweeps import expand

    bench = _bench()
    base = bench.seeds()[-1]
    for value in ("m" * 300, "/" + "d" * 300 + "/model", "tiny\x00llama", "caf\udce9"):
        assert bench.outcome({**base, "base_model": value}) == ("error", "")
        datasets = [{"path": value, "type": "alpaca"}]
        assert bench.outcome({**base, "datasets": datasets}) == ("error", "")
    trials, _ = expand({"learning_rate": [1e-4, math.inf, -math.inf, math.nan]})
    assert [t.name for t in trials] == ["lr=1e-4", "lr=inf", "lr=-inf", "lr=nan"]


def test_mutation_is_reproducible():
    bench = _bench()
    first = [bench.mutate(bench.seeds()[0], random.Random(7)) for _ in range(3)]
    again = [bench.mutate(bench.seeds()[0], random.Random(7)) for _ in range(3)]
    assert repr(first) == repr(again)
