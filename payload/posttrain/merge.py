"""`launch merge-lora`: the trained LoRA adapter folded into its base model's weights,
saved as one ordinary model (`save_pretrained`, plus the tokenizer) that loads without
peft.

For a QLoRA run (`load_in_4bit`) or 8-bit LoRA, the adapter was trained on the base's
quantized weights, so it is merged into those weights de-quantized (the base loaded in
4 or 8 bits exactly as in training, then expanded back by bitsandbytes), not into the
original full-precision weights: the merged model then computes what the trained model
computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from payload.errors import FerryError
from payload.posttrain import loading
from payload.posttrain.target import Target

DEFAULT_DEST = "merged"  # under the output folder, as Axolotl's merge-lora does


@dataclass
class Merged:
    dest: Path
    dequantized: bool  # merged into a de-quantized 4-bit / 8-bit base
    dtype: str


def merge(target: Target, dest: str | Path | None = None) -> Merged:
    """Merge the target's adapter into its base and save the result to `dest` (default
    `<model folder>/merged`)."""
    if not target.adapter:
        raise FerryError(
            f"{target.name} has no LoRA adapter to merge: {target.model_dir} holds a whole "
            "model (a full fine-tune, no `adapter:` in its config).",
            hint="Use that folder as it is; launch inference and launch quantize take it too.",
        )
    loading.quiet()
    model, tok = merged_model(target)
    out = Path(dest).expanduser().resolve() if dest else target.model_dir / DEFAULT_DEST
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # A vision-language model's processor (tokenizer + image processor + template) goes
    # with it, so that the merged folder reads pictures as the adapter's did.
    (loading.processor(target) if target.cfg.processor_type else tok).save_pretrained(out)
    cfg = target.cfg
    return Merged(out, bool(cfg.load_in_4bit or cfg.load_in_8bit), str(model.dtype).split(".")[-1])


def merged_model(target: Target) -> tuple[object, object]:
    """(merged model, tokenizer), in memory."""
    from peft import PeftModel

    tok = loading.tokenizer(target)
    base = loading.dequantized(loading.base_model(target, tok), target.cfg)
    model = PeftModel.from_pretrained(base, target.model_dir).merge_and_unload()
    model.eval()
    # Training may have turned the KV cache off (gradient checkpointing, packing); the
    # saved model is for generation.
    model.config.use_cache = True
    return model, tok
