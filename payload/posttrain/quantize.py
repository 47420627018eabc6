"""`launch quantize`: torchao post-training quantization of the trained model (Axolotl's
`quantization:` keys), saved to a folder that `from_pretrained` loads again (its
config.json carries the `quantization_config`, so transformers rebuilds torchao's
tensors on load; torchao must be installed where it is loaded).

A LoRA run's adapter is merged first (payload.posttrain.merge, de-quantized base for
QLoRA); a full fine-tune is quantized as it is. The weights of every linear layer but
the output head are quantized (the embeddings and the head stay in full precision).

The formats, by (weight_dtype, activation_dtype), and where they run with torchao 0.18:

    int8, none     Int8WeightOnlyConfig: one scale per row, or per `group_size` weights
    int4, none     on a GPU Int4WeightOnlyConfig (packed int4, group_size default 32, as
                   Axolotl's); on the CPU torchao's packed int4 kernels do not run, so
                   IntxWeightOnlyConfig(int4): the same int4 values and scales, held one
                   per byte
    int4, int8     Int8DynamicActivationIntxWeightConfig(int4): activations quantized per
                   token on the fly, int4 weights per group (CPU and GPU)
    int8, int8     Int8DynamicActivationInt8WeightConfig: per-row scales (CPU and GPU)
    float8, float8 Float8DynamicActivationFloat8WeightConfig: a GPU with compute
                   capability 8.9 or more (Ada, Hopper) only

Other pairs are refused by the config rules (payload/config/rules.py) before this runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload.config.rules import QUANT_PAIRS, quant_dtype
from payload.config.schema import QuantizationConfig
from payload.errors import FerryError
from payload.posttrain import loading
from payload.posttrain.target import Target

DEFAULT_DEST = "quantized"  # under the output folder, as Axolotl's quantize does
INT4_GROUP = 32  # Axolotl's default group_size


@dataclass
class Quantized:
    dest: Path
    scheme: str  # what was made, in words
    torchao_config: str  # the torchao config class used
    device: str
    merged: bool  # an adapter was merged first


def torchao_config(q: QuantizationConfig, cuda: bool, capability: tuple[int, int] | None) -> Any:
    """The torchao config for the section on this device; FerryError where it cannot run."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
        PerRow,
    )

    pair = (quant_dtype(q.weight_dtype), quant_dtype(q.activation_dtype))
    if pair not in QUANT_PAIRS:  # the rules refuse these; a config built in code may not
        raise FerryError(f"quantization: {pair} is not a format launch quantize makes.")
    if pair == ("int8", None):
        granularity = PerGroup(q.group_size) if q.group_size else PerRow()
        return Int8WeightOnlyConfig(granularity=granularity)
    group = q.group_size or INT4_GROUP
    if pair == ("int4", None):
        if cuda:
            return Int4WeightOnlyConfig(group_size=group)
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))
    if pair == ("int4", "int8"):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group)
        )
    if pair == ("int8", "int8"):
        return Int8DynamicActivationInt8WeightConfig()
    if not cuda or capability is None or capability < (8, 9):
        where = f"this GPU has compute capability {capability}" if cuda else "this machine has none"
        raise FerryError(
            "quantization: float8 weights and activations need a CUDA GPU with compute "
            f"capability 8.9 or more (Ada, Hopper); {where}.",
            hint="Use weight_dtype int8 or int4 here.",
        )
    return Float8DynamicActivationFloat8WeightConfig()


def quantize(target: Target, dest: str | Path | None = None) -> Quantized:
    import torch
    from transformers import TorchAoConfig

    from payload.posttrain.merge import merged_model

    loading.quiet()
    q = target.cfg.quantization or QuantizationConfig()
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    ao = torchao_config(q, cuda, capability)
    out = Path(dest).expanduser().resolve() if dest else target.model_dir / DEFAULT_DEST
    device = "cuda" if cuda else "cpu"
    with tempfile.TemporaryDirectory(prefix="ferry-merged-") as tmp:
        source = target.model_dir
        if target.adapter:
            # Through a saved merged model: transformers quantizes while it loads, which
            # also decides (as it does for every torchao model) which layers to leave.
            model, tok = merged_model(target)
            model.save_pretrained(tmp)
            del model
            source = Path(tmp)
        else:
            tok = loading.tokenizer(target)
        _check_groups(source, target, q, ao)
        config = TorchAoConfig(quant_type=ao)
        try:
            model = loading.full_model(
                target, source, quantization_config=config, device_map=device
            )
        except (RuntimeError, NotImplementedError) as e:
            raise FerryError(
                f"torchao could not quantize {target.name} with {type(ao).__name__} on "
                f"{device}: {e}"
            ) from e
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    scheme = QUANT_PAIRS[(quant_dtype(q.weight_dtype), quant_dtype(q.activation_dtype))]
    return Quantized(out, scheme, type(ao).__name__, device, target.adapter)


def _check_groups(source: Path, target: Target, q: QuantizationConfig, ao: Any) -> None:
    """Every quantized layer's input width must be a multiple of the group size (torchao
    would otherwise leave the layer as it is, or fail, without naming the key)."""
    import json

    granularity = getattr(ao, "granularity", None) or getattr(ao, "weight_granularity", None)
    group = getattr(granularity, "group_size", None) or getattr(ao, "group_size", None)
    if not group:
        return
    config = json.loads((source / "config.json").read_text())
    widths = {
        name: config[name]
        for name in ("hidden_size", "intermediate_size")
        if isinstance(config.get(name), int)
    }
    if isinstance(config.get("head_dim"), int) and isinstance(
        config.get("num_attention_heads"), int
    ):
        # The attention output projection reads every head's output.
        widths["heads x head_dim"] = config["head_dim"] * config["num_attention_heads"]
    bad = {name: w for name, w in widths.items() if w % group}
    if bad:
        shown = ", ".join(f"{name} {w}" for name, w in bad.items())
        raise FerryError(
            f"quantization.group_size: {group} does not divide the layers' input widths of "
            f"{target.cfg.base_model} ({shown}).",
            hint="Use a group size that divides them (32, 64, 128 usually do).",
        )
