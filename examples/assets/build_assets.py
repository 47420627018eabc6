"""Build the tiny model and tokenizer that the examples and tests train, offline.

    python examples/assets/build_assets.py [--out examples/assets]

- `tiny-tokenizer/`: a byte-level BPE tokenizer (1,024 tokens) trained on text written for
  Ferry (`corpus.txt` and `examples/data/alpaca_tiny.jsonl`), with a ChatML chat template.
- `tiny-llama/`: a Llama with random weights (about 0.9M parameters) in safetensors, sized
  so that a LoRA fine-tune of the quickstart takes about a minute on two CPU cores.

Both are deterministic: weights come from a seeded generator in a fixed parameter order,
not from transformers' init (which may change between releases), and a test rebuilds
them and compares with the files checked in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "alpaca_tiny.jsonl"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
SEED = 1234
INIT_STD = 0.02
# The output head is tied to the embedding and LoRA cannot change it. At std 0.02 its
# logits could never spread more than a few units, capping how far the quickstart's loss
# can fall; at 0.05 the untrained loss is still about ln(vocab) (near uniform).
EMBED_STD = 0.05


def training_text() -> list[str]:
    texts = [(HERE / "corpus.txt").read_text(encoding="utf-8")]
    for line in DATA.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append("\n".join(v for v in row.values() if v))
    return texts


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from payload.data.templates import BUILTIN_TEMPLATES

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Llama convention: every encoded text starts with <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=MODEL["max_position_embeddings"],
        padding_side="right",
    )
    fast.chat_template = BUILTIN_TEMPLATES["chatml"]
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(SEED)
    state = {}
    for name, param in sorted(model.state_dict().items()):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape)
        else:
            std = EMBED_STD if "embed_tokens" in name else INIT_STD
            state[name] = torch.randn(param.shape, generator=generator) * std
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.out / "tiny-tokenizer")
    build_model(args.out / "tiny-llama", tokenizer)
    # The model folder also carries the tokenizer, so `base_model` alone is enough.
    tokenizer.save_pretrained(args.out / "tiny-llama")
    print(f"wrote {args.out / 'tiny-tokenizer'} and {args.out / 'tiny-llama'}")


if __name__ == "__main__":
    main()
