"""Build the tiny vision-language model and the image-chat data the VLM examples and tests
use, offline.

    python examples/assets/build_vlm.py [--out examples/assets] [--data examples/data]

- `tiny-vlm/`: a LLaVA-style model with random weights (about 230k parameters): a CLIP
  vision tower (32x32 images, 8x8 patches: 16 image tokens per image), a two-layer
  projector and a two-layer Llama, with its processor: the bundled tiny tokenizer plus an
  `<image>` token, a CLIP image processor and a ChatML template that writes `<image>`
  where a message has an image part.
- `shapes/` (under `--data`): 32x32 PNG pictures of a circle, a square and a triangle in
  red, green, blue and yellow, drawn with Pillow, and `shapes.jsonl`: chats about them
  (OpenAI-style content parts, an `images` column of paths relative to the file), whose
  answers name the shape and the colour; some have two turns, some two pictures.

Deterministic, like build_assets.py: weights come from a seeded generator in a fixed
parameter order, and a test rebuilds everything and compares it with the files checked in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
IMAGE_TOKEN = "<image>"
IMAGE = 32
PATCH = 8
SEED = 4321
INIT_STD = 0.02
# The output head is its own (untied: a tied head makes a random model repeat its input
# token, which LoRA, leaving the head as it is, is slow to unlearn) and wide enough for its
# logits to spread.
EMBED_STD = 0.1
TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": IMAGE,
    "patch_size": PATCH,
    "projection_dim": 32,
}
# ChatML, with content that is either text or a list of parts ({"type": "image"} is
# written as the image token, {"type": "text"} as its text).
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (235, 215, 40)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")


def build_processor(out: Path):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(HERE / "tiny-tokenizer")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", IMAGE_TOKEN]}
    )
    tokenizer.chat_template = TEMPLATE
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    # The CLS token the tower adds is dropped ("default" strategy): 16 patch tokens.
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    processor.save_pretrained(out)
    return processor


def build_model(out: Path, tokenizer) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(SEED)
    state = {}
    for name, param in sorted(model.state_dict().items()):
        if "norm" in name and name.endswith("weight"):
            state[name] = torch.ones(param.shape)
        elif "norm" in name and name.endswith("bias") or name.endswith("position_ids"):
            state[name] = torch.zeros(param.shape, dtype=param.dtype)
            if name.endswith("position_ids"):
                state[name] = torch.arange(param.shape[-1]).expand(param.shape).clone()
        else:
            std = EMBED_STD if "embed_tokens" in name or "lm_head" in name else INIT_STD
            state[name] = torch.randn(param.shape, generator=generator) * std
    model = LlavaForConditionalGeneration(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.save_pretrained(out, safe_serialization=True)


def draw(shape: str, colour: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE, IMAGE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((4, 4, 27, 27), fill=fill)
    elif shape == "square":
        pen.rectangle((5, 5, 26, 26), fill=fill)
    else:
        pen.polygon([(16, 3), (29, 28), (3, 28)], fill=fill)
    return image


def user(*parts: str | None) -> dict:
    """A user message: None is an image part, a string a text part."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def build_data(out: Path) -> int:
    folder = out / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [(shape, colour) for colour in COLOURS for shape in SHAPES]
    for shape, colour in pictures:
        draw(shape, colour).save(folder / f"{colour}_{shape}.png", optimize=False)
    rows = []
    for i, (shape, colour) in enumerate(pictures):
        path = f"shapes/{colour}_{shape}.png"
        rows.append({"messages": [user(None, "What is in the picture?"),
                                  assistant(f"A {colour} {shape}.")],
                     "images": [path]})  # fmt: skip
        rows.append({"messages": [user(None, "What colour is it?"), assistant(f"It is {colour}.")],
                     "images": [path]})  # fmt: skip
        rows.append({"messages": [user("What shape is this?", None), assistant(f"A {shape}.")],
                     "images": [path]})  # fmt: skip
        # Two turns: both answers are trained.
        rows.append({"messages": [user(None, "What colour is it?"), assistant(f"It is {colour}."),
                                  user("And the shape?"), assistant(f"A {shape}.")],
                     "images": [path]})  # fmt: skip
        # Two pictures: this one and the next.
        other_shape, other_colour = pictures[(i + 1) % len(pictures)]
        rows.append({"messages": [user(None, None, "What is in the two pictures?"),
                                  assistant(f"A {colour} {shape} and a {other_colour} "
                                            f"{other_shape}.")],
                     "images": [path, f"shapes/{other_colour}_{other_shape}.png"]})  # fmt: skip
    with (out / "shapes.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    processor = build_processor(args.out / "tiny-vlm")
    build_model(args.out / "tiny-vlm", processor.tokenizer)
    rows = build_data(args.data)
    print(f"wrote {args.out / 'tiny-vlm'} and {rows} rows in {args.data / 'shapes.jsonl'}")


if __name__ == "__main__":
    main()
