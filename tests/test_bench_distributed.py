"""The MFU arithmetic of bench/distributed_gpu.py, on CPU, against numbers worked by hand.
The GPU run itself is in the GPU tier (tests/test_gpu.py); a wrong formula there would
print a plausible-looking MFU, so the arithmetic is pinned here."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import ROOT


def _bench():
    path = ROOT / "bench" / "distributed_gpu.py"
    spec = importlib.util.spec_from_file_location("distributed_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_and_mfu_by_hand():
    """SmolLM2-135M's shape (134,515,008 parameters, tied; 30 layers of 9 heads x 64) at
    T=2048: 6 N = 807,090,048 and 12 L H Q T = 12*30*9*64*2048 = 424,673,280. At 100,000
    tokens/s on a 989 TFLOP/s GPU: 1.2317633e14 / 9.89e14 = 12.4546 %."""
    bench = _bench()
    flops = bench.flops_per_token(134_515_008, 30, 9, 64, 2048)
    assert flops == 807_090_048 + 424_673_280
    assert bench.mfu(100_000, flops, 989e12) == pytest.approx(12.4546, abs=1e-4)
    assert bench.mfu(1000, 6e9, 1e13) == pytest.approx(60.0)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA H100 PCIe", None),  # 756 TFLOP/s: not guessed as an SXM
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L40S", None),  # contains "L4"
        ("cpu", None),
    ],
)
def test_peak_is_known_only_for_the_listed_gpus(name, peak):
    assert _bench().peak_bf16_flops(name) == peak
