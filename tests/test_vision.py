"""Vision-language fine-tuning (issue 19): the tiny LLaVA-style model and the shapes data
under examples/, image-chat rows labelled exactly, bad picture rows counted, the example
trained through the real CLI, frozen towers, the adapter reloaded, inference about a
picture, Axolotl's VLM configs validated and planned, and pictures shipped with remote
jobs. Nothing is faked: the real processor, model and CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ASSETS, ROOT, launch

EXAMPLE = ROOT / "examples" / "vision_lora.yml"
SHAPES = ROOT / "examples" / "data" / "shapes.jsonl"
VLM = ASSETS / "tiny-vlm"
IMAGE_TOKENS = 16  # 32x32 pictures in 8x8 patches, the CLS token dropped


def vlm_config(tmp_path: Path, extra: str = "", name: str = "vlm.yml") -> Path:
    """The example, with its files named by absolute paths and `extra` (YAML) merged in."""
    import yaml

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["base_model"] = str(VLM)
    raw["datasets"][0]["path"] = str(SHAPES)
    raw.update(yaml.safe_load(extra) or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    return path


def processor_and_config(tmp_path: Path, extra: str = ""):
    from payload.config.loader import load_config
    from payload.model import load_processor

    cfg = load_config(vlm_config(tmp_path, extra))
    return load_processor(cfg), cfg


# ---- assets


@pytest.mark.slow
def test_build_vlm_reproduces_the_checked_in_files(tmp_path):
    """examples/assets/build_vlm.py rebuilds the model, processor, pictures and rows."""
    from PIL import Image
    from safetensors.torch import load_file

    subprocess.run(
        [sys.executable, str(ASSETS / "build_vlm.py"), "--out", str(tmp_path / "assets"),
         "--data", str(tmp_path / "data")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    built = tmp_path / "assets" / "tiny-vlm"
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (built / name).read_text() == (VLM / name).read_text(), name
    shipped = load_file(VLM / "model.safetensors")
    fresh = load_file(built / "model.safetensors")
    assert fresh.keys() == shipped.keys()
    assert all(fresh[k].equal(v) for k, v in shipped.items())
    params = sum(t.numel() for t in shipped.values())
    assert 1e5 < params < 1e6, params  # "a few hundred thousand parameters"
    assert (tmp_path / "data" / "shapes.jsonl").read_text() == SHAPES.read_text()
    pictures = sorted((SHAPES.parent / "shapes").glob("*.png"))
    assert len(pictures) == 12  # 3 shapes x 4 colours
    for picture in pictures:
        again = Image.open(tmp_path / "data" / "shapes" / picture.name)
        assert again.tobytes() == Image.open(picture).tobytes(), picture.name


def test_a_shapes_picture_shows_its_colour():
    """The pictures are what their names say: the centre pixel has the colour."""
    from PIL import Image

    centre = Image.open(SHAPES.parent / "shapes" / "blue_square.png").getpixel((16, 16))
    assert centre == (40, 60, 220)
    corner = Image.open(SHAPES.parent / "shapes" / "red_circle.png").getpixel((1, 1))
    assert corner == (255, 255, 255)


# ---- labels


def rows_of(indices: list[int]) -> list[dict]:
    lines = SHAPES.read_text().splitlines()
    return [json.loads(lines[i]) for i in indices]


def test_labels_are_exactly_the_assistant_turns_and_never_an_image_token(tmp_path):
    """A batch of three rows (one picture; two turns; two pictures): the labelled tokens
    are exactly each assistant turn's text plus its <|im_end|>, written out here as text
    and tokenized on their own; every image token and every pad is -100."""
    from payload.data import vision

    processor, cfg = processor_and_config(tmp_path)
    train, _, report = vision.build(cfg, processor)
    assert report.rows_kept == 60 and len(train) == 60
    batch = vision.VisionCollator(cfg, processor)([train[0], train[3], train[4]])
    tok = processor.tokenizer

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    expected = [
        encode("A red circle.<|im_end|>"),
        encode("It is red.<|im_end|>") + encode("A circle.<|im_end|>"),
        encode("A red circle and a red square.<|im_end|>"),
    ]
    image = tok.convert_tokens_to_ids("<image>")
    for r, want in enumerate(expected):
        ids, labels = batch["input_ids"][r], batch["labels"][r]
        trained = [int(t) for t, label in zip(ids, labels, strict=True) if label != -100]
        assert trained == want, (r, tok.decode(trained))
        assert all(int(x) == int(t) for t, x in zip(ids, labels, strict=True) if x != -100)
        real = int(batch["attention_mask"][r].sum())
        assert (labels[real:] == -100).all()  # padding
        images = 2 if r == 2 else 1
        assert int((ids == image).sum()) == IMAGE_TOKENS * images
        assert not (labels == image).any()
    assert tuple(batch["pixel_values"].shape) == (4, 3, 32, 32)  # 1 + 1 + 2 pictures
    # debug: true shows the same, on the template's text.
    first = vision.debug_rows(train, processor, 1)[0]
    assert "1 image(s), 6 trained" in first and "[[A red circle.<|im_end|>]]" in first, first


def test_train_on_inputs_still_never_trains_image_tokens(tmp_path):
    """With train_on_inputs every turn's text trains, the user's question included, and
    still none of the 16 image tokens (nor the role headers)."""
    from payload.data import vision

    processor, cfg = processor_and_config(tmp_path, "train_on_inputs: true\n")
    train, _, _ = vision.build(cfg, processor)
    batch = vision.VisionCollator(cfg, processor)([train[0]])
    tok = processor.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = [int(t) for t, label in zip(ids, labels, strict=True) if label != -100]
    want = tok("What is in the picture?<|im_end|>", add_special_tokens=False)["input_ids"]
    want += tok("A red circle.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert trained == want, tok.decode(trained)


def test_skip_prepare_dataset_processes_each_batch_to_the_same_tensors(tmp_path):
    """skip_prepare_dataset: rows are only checked up front (no expanded tokens kept) and
    processed when the batch is drawn, to exactly the tensors the prepared rows give."""
    from payload.data import vision

    processor, cfg = processor_and_config(tmp_path)
    prepared, _, _ = vision.build(cfg, processor)
    processor, lazy_cfg = processor_and_config(tmp_path, "skip_prepare_dataset: true\n")
    lazy, _, report = vision.build(lazy_cfg, processor)
    assert all(r.expanded is None for r in lazy.rows)
    assert all(r.expanded is not None for r in prepared.rows)
    assert any("skip_prepare_dataset" in note for note in report.notes)
    pick = [1, 3, 4, 7]
    a = vision.VisionCollator(cfg, processor)([prepared[i] for i in pick])
    b = vision.VisionCollator(lazy_cfg, processor)([lazy[i] for i in pick])
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "pixel_values", "labels"}
    for key in a:
        assert a[key].equal(b[key]), key


def test_image_size_resizes_as_axolotl_does(tmp_path):
    """A side pads to a square with the aspect kept; [width, height] is a plain resize."""
    from PIL import Image

    from payload.config.loader import validate_mapping
    from payload.data.vision import Pictures

    wide = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (200, 0, 0)).save(wide)
    base = {"base_model": str(VLM), "processor_type": "AutoProcessor", "learning_rate": 1e-3,
            "datasets": [{"path": str(SHAPES), "type": "chat_template"}]}  # fmt: skip
    square = Pictures(validate_mapping({**base, "image_size": 16}), []).load(str(wide))
    assert square.size == (16, 16)
    assert square.getpixel((8, 2)) == (0, 0, 0)  # the padding band above the picture
    assert square.getpixel((8, 8)) == (200, 0, 0)
    plain = Pictures(validate_mapping({**base, "image_size": [10, 30]}), []).load(str(wide))
    assert plain.size == (10, 30)
    assert plain.getpixel((5, 1)) == (200, 0, 0)  # stretched, not padded

    # image_resize_algorithm: a hard edge stays hard with nearest, blends with bilinear.
    edge = tmp_path / "edge.png"
    stripes = Image.new("RGB", (8, 8), (0, 0, 0))
    stripes.paste((255, 255, 255), (4, 0, 8, 8))
    stripes.save(edge)
    colours = {}
    for algorithm in ("nearest", "bilinear"):
        cfg = validate_mapping({**base, "image_size": [3, 3], "image_resize_algorithm": algorithm})
        colours[algorithm] = Pictures(cfg, []).load(str(edge)).getpixel((1, 1))
    assert colours["nearest"] in ((0, 0, 0), (255, 255, 255))
    assert colours["bilinear"] not in ((0, 0, 0), (255, 255, 255)), colours


def test_processor_kwargs_reach_the_processor(tmp_path):
    """processor_kwargs go to from_pretrained: without the CLS token counted, the tiny
    processor writes 15 image tokens per picture instead of 16."""
    from payload.data import vision

    processor, cfg = processor_and_config(
        tmp_path, "processor_kwargs: {num_additional_image_tokens: 0}\n"
    )
    assert processor.num_additional_image_tokens == 0
    row = vision.build(cfg, processor)[0][0]
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert row.expanded.count(image) == IMAGE_TOKENS - 1


# ---- bad rows


def bad_rows_folder(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    img, question = {"type": "image"}, {"type": "text", "text": "What is it?"}

    def row(parts: list, images: list) -> dict:
        answer = {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}
        return {"messages": [{"role": "user", "content": parts}, answer], "images": images}

    rows = [
        row([img, question], ["good.png"]),
        row([img, question], ["missing.png"]),  # row 1
        row([img, question], ["broken.png"]),  # row 2
        row([img, img, question], ["good.png"]),  # row 3
        row([img, question], ["good.png", "good.png"]),  # row 4
        row([img, question], ["also-missing.png"]),  # row 5
        row([img, question], ["good.png"]),
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cfg.yml").write_text(
        f"base_model: {VLM}\nprocessor_type: AutoProcessor\nsequence_len: 256\n"
        "datasets:\n  - path: rows.jsonl\n    type: chat_template\n"
        "adapter: lora\nlora_target_linear: true\nlearning_rate: 0.001\n"
    )
    return tmp_path / "cfg.yml"


def test_bad_picture_rows_are_counted_by_reason_with_the_first_row_named(tmp_path):
    """Through `launch preprocess`: 2 of 7 rows kept; each reason counted once per row,
    naming the first row and its file."""
    config = bad_rows_folder(tmp_path)
    done = launch("preprocess", str(config), cwd=tmp_path, check=True)
    where = f"datasets[0] ({tmp_path / 'rows.jsonl'})"
    lines = [x.strip() for x in done.stdout.splitlines()]
    from transformers import AutoTokenizer

    text = ("<|im_start|>user\n<image>What is it?<|im_end|>\n<|im_start|>assistant\n"
            "A red square.<|im_end|>\n")  # fmt: skip
    tokens = len(AutoTokenizer.from_pretrained(VLM)(text, add_special_tokens=False)["input_ids"])
    tokens += IMAGE_TOKENS - 1  # the placeholder becomes the picture's 16 tokens
    assert f"2 of 7 rows kept (2 train, 0 eval), {2 * tokens} tokens" in lines, done.stdout
    assert (f"skipped 2: image file not found (first: {where} row 1, `missing.png` (looked in "
            f"{tmp_path}))") in lines, done.stdout  # fmt: skip
    assert any(
        x.startswith(f"skipped 1: image cannot be read (first: {where} row 2, ")
        and "broken.png" in x
        for x in lines
    ), done.stdout
    assert (f"skipped 1: more image parts than pictures (first: {where} row 3, 2 image "
            "part(s) without a picture of their own, 1 in `images`)") in lines  # fmt: skip
    assert (f"skipped 1: more pictures than image parts (first: {where} row 4, 1 image "
            "part(s) without a picture of their own, 2 in `images`)") in lines  # fmt: skip


def test_strict_stops_at_the_first_bad_picture_and_audio_is_refused_by_name(tmp_path):
    from payload.config.loader import load_config
    from payload.data import vision
    from payload.errors import FerryError
    from payload.model import load_processor

    config = bad_rows_folder(tmp_path)
    config.write_text(config.read_text() + "strict: true\n")
    cfg = load_config(config)
    processor = load_processor(cfg)
    with pytest.raises(FerryError, match=r"row 1: image file not found: `missing.png`"):
        vision.build(cfg, processor)
    audio = {"messages": [{"role": "user", "content": [{"type": "audio"}, {"type": "text",
             "text": "What is said?"}]}, {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    (tmp_path / "rows.jsonl").write_text(json.dumps(audio) + "\n")
    with pytest.raises(FerryError, match=r"row 0: a message has a part of type `audio`; Ferry"):
        vision.build(load_config(config), processor)


# ---- validate


QWEN2_VL = """
base_model: Qwen/Qwen2-VL-7B-Instruct
processor_type: AutoProcessor
strict: false

skip_prepare_dataset: true
remove_unused_columns: false
sample_packing: false

chat_template: qwen2_vl
datasets:
  - path: HuggingFaceH4/llava-instruct-mix-vsft
    type: chat_template
    split: train[:1%]
    field_messages: messages
dataset_prepared_path: last_run_prepared
val_set_size: 0.0
output_dir: ./outputs/out

adapter: lora
lora_model_dir:

sequence_len: 8192
pad_to_sequence_len: false

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true

gradient_accumulation_steps: 4
micro_batch_size: 1
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: true
fp16:
tf32: true

gradient_checkpointing: true
logging_steps: 1
flash_attention: true
eager_attention:

warmup_ratio: 0.1
saves_per_epoch: 1
weight_decay: 0.0
"""

GEMMA3_QLORA = """
base_model: google/gemma-3-4b-it
processor_type: AutoProcessor
load_in_4bit: true
skip_prepare_dataset: true
remove_unused_columns: false
sample_packing: false
ddp_find_unused_parameters: true
chat_template: gemma3
datasets:
  - path: HuggingFaceH4/llava-instruct-mix-vsft
    type: chat_template
    split: train[:1%]
    field_messages: messages
val_set_size: 0.01
adapter: qlora
sequence_len: 2048
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: 'TARGETS'
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
learning_rate: 0.0002
bf16: true
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
flash_attention: true
""".replace(
    "TARGETS",
    r"language_model.model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj",
)


@pytest.mark.parametrize("text", [QWEN2_VL, GEMMA3_QLORA], ids=["qwen2_vl", "gemma3_qlora"])
def test_axolotl_vlm_configs_validate_and_plan_for_modal(tmp_path, text):
    """Axolotl's own VLM examples (hub ids, AutoProcessor, skip_prepare_dataset, the
    family's template), as written: valid, and planned for Modal without the hub."""
    config = tmp_path / "vlm.yml"
    config.write_text(textwrap.dedent(text))
    online = {"HF_HUB_OFFLINE": None}  # hub ids are checked by form, nothing is fetched
    done = launch("validate", str(config), env=online, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout
    plan = launch("train", str(config), "--cloud", "modal", "--gpus", "H100:1", "--dry-run",
                  env=online, cwd=tmp_path)  # fmt: skip
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "dry run: nothing was started" in plan.stdout
    assert re.search(r"gpu\s+H100:1", plan.stdout)


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("sample_packing: true\n", "sample_packing", "cannot pack image chats"),
        ("rl: dpo\n", "rl", "supervised fine-tuning on image chats only"),
        ("remove_unused_columns: true\n", "remove_unused_columns", "drop the columns"),
        ("image_size: [10, 20, 30]\n", "image_size", "[width, height]"),
        ("processor_type: LlavaProcesor\n", "processor_type", "not a processor class"),
        ("context_parallel_size: 2\n", "context_parallel_size", "image tokens must stay"),
        ("group_by_length: true\n", "group_by_length", "cannot be used with processor_type"),
        (
            "dataset_exact_deduplication: true\n",
            "dataset_exact_deduplication",
            "cannot be used with processor_type",
        ),
        ("dataset_shard_num: 2\n", "dataset_shard_num", "cannot be used with processor_type"),
        ("lora_target_linear: null\n", "lora_target_modules", "peft picks its own default"),
    ],
)
def test_validate_refuses_what_image_rows_cannot_do(tmp_path, extra, key, words):
    config = vlm_config(tmp_path, extra)
    done = launch("validate", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert f"- {key}:" in done.stderr and words in done.stderr, done.stderr


def test_processor_keys_on_a_text_config_are_refused(tmp_path):
    from helpers import quickstart_config

    config = quickstart_config(tmp_path, "freeze_mm_modules: true\nimage_size: 32\n")
    done = launch("validate", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert "- freeze_mm_modules: only applies to a vision-language run" in done.stderr
    assert "- image_size: only applies to a vision-language run" in done.stderr


# ---- the model


def test_freeze_and_lora_targets_on_the_loaded_model(tmp_path):
    """LoRA lands on the language model's linear layers only; freeze_mm_modules stops
    the tower and the projector from training (a full fine-tune shows it; without the key
    they train)."""
    from payload.config.loader import load_config
    from payload.model import load_model

    processor, cfg = processor_and_config(tmp_path)
    model = load_model(cfg, processor.tokenizer, head="AutoModelForImageTextToText")
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert lora and all(".language_model.layers." in n for n in lora), sorted(lora)
    assert len(lora) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down

    for freeze in (True, False):
        extra = f"adapter: null\nfreeze_mm_modules: {str(freeze).lower()}\n"
        full = vlm_config(tmp_path, extra, name=f"full-{freeze}.yml")
        model = load_model(
            load_config(full), processor.tokenizer, head="AutoModelForImageTextToText"
        )
        towers = [p.requires_grad for n, p in model.named_parameters()
                  if "vision_tower" in n or "multi_modal_projector" in n]  # fmt: skip
        language = [p.requires_grad for n, p in model.named_parameters() if "language_model" in n]
        assert towers and all(language)
        assert all(not t for t in towers) if freeze else all(towers)


def test_qlora_on_the_vlm_trains_only_the_language_models_adapter(tmp_path):
    """adapter: qlora + load_in_4bit: the linear layers are 4-bit, LoRA sits on the
    language model's, and one step on a real batch gives a finite loss whose gradients
    reach the adapter and nothing else."""
    import torch

    from payload.data import vision
    from payload.model import load_model

    processor, cfg = processor_and_config(tmp_path, "adapter: qlora\nload_in_4bit: true\n")
    model = load_model(cfg, processor.tokenizer, head="AutoModelForImageTextToText")
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj.base_layer")}
    assert kinds == {"Linear4bit"}, kinds
    train, _, _ = vision.build(cfg, processor)
    batch = vision.VisionCollator(cfg, processor)([train[0], train[4]])
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded and all("lora_" in n and "language_model" in n for n in graded), graded


def test_a_row_with_a_picture_and_no_image_part_gets_one_where_axolotl_puts_it(tmp_path):
    """LLaVA-style rows often give `images` and plain text messages: one image part per
    picture goes at the start of the first user message."""
    from payload.config.loader import load_config
    from payload.data import vision

    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "What is it?"},
                        {"role": "assistant", "content": "A red circle."}],
           "images": [str(SHAPES.parent / "shapes" / "red_circle.png")]}  # fmt: skip
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps(row) + "\n")
    processor, _ = processor_and_config(tmp_path)
    cfg = load_config(vlm_config(tmp_path, f"datasets: [{{path: {data}, type: chat_template}}]\n"))
    (prepared,), _, report = vision.build(cfg, processor)
    assert report.rows_kept == 1
    assert prepared.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>What is it?"
        "<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
    )


def test_url_pictures_are_fetched_once_and_a_failed_request_is_retried(tmp_path, ferry_home):
    """A real HTTP server on 127.0.0.1 serves a picture; its first answer is a 503. The
    picture loads (the request was retried), twice from one fetch (the copy under
    $FERRY_HOME/pictures), and an error never shows the URL's query (a signature)."""
    import http.server
    import threading

    from payload.data.vision import Pictures, describe

    body = (SHAPES.parent / "shapes" / "red_circle.png").read_bytes()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            if len(hits) == 1:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/red.png?X-Amz-Signature=secret"
        pictures = Pictures(processor_and_config(tmp_path)[1], [])
        first = pictures.load(url)
        again = pictures.load(url)
    finally:
        server.shutdown()
    assert first.getpixel((16, 16)) == again.getpixel((16, 16)) == (220, 30, 30)
    assert len(hits) == 2  # one 503, one answer; the second load read the copy
    assert len(list((ferry_home / "pictures").iterdir())) == 1
    assert "secret" not in describe(url)


def test_a_hugging_face_image_column_is_read_as_bytes(tmp_path):
    """A saved Hugging Face dataset whose `images` column has the Image feature (as hub
    VLM sets do): its pictures come as bytes, undecoded until used, and batch like files."""
    import datasets

    from payload.config.loader import load_config
    from payload.data import vision

    rows = rows_of([0, 4])
    for row in rows:
        row["images"] = [str(SHAPES.parent / p) for p in row["images"]]
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"),
                                   "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
    })  # fmt: skip
    saved = tmp_path / "hub_like"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(saved))
    processor, _ = processor_and_config(tmp_path)
    cfg = load_config(vlm_config(tmp_path, f"datasets: [{{path: {saved}, type: chat_template}}]\n"))
    train, _, report = vision.build(cfg, processor)
    assert report.rows_kept == 2
    assert all(isinstance(s, dict) and s.get("bytes") for r in train.rows for s in r.images)
    batch = vision.VisionCollator(cfg, processor)([train[0], train[1]])
    assert tuple(batch["pixel_values"].shape) == (3, 3, 32, 32)
    tok = processor.tokenizer
    trained = [int(t) for t, x in zip(batch["input_ids"][0], batch["labels"][0], strict=True)
               if x != -100]  # fmt: skip
    assert trained == tok("A red circle.<|im_end|>", add_special_tokens=False)["input_ids"]


def test_a_template_that_writes_no_image_placeholder_is_refused(tmp_path):
    """A text-only template cannot place pictures, which would then never reach the model.
    The first row says so."""
    from payload.data import vision
    from payload.errors import FerryError

    template = tmp_path / "text_only.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{{ m['content'][-1]['text'] }}{% endif %}\n{% endfor %}"
    )
    extra = f"chat_template: jinja\nchat_template_jinja: {template}\n"
    processor, cfg = processor_and_config(tmp_path, extra)
    with pytest.raises(FerryError, match=r"row 0: the chat template wrote no image placeholder"):
        vision.build(cfg, processor)


def test_skip_prepare_dataset_rows_too_long_stop_the_batch_naming_the_row(tmp_path):
    """With skip_prepare_dataset a row's length is only known when its batch is drawn: one
    longer than sequence_len stops the run there, naming it. pad_to_sequence_len pads
    every per-token tensor to sequence_len."""
    from payload.data import vision
    from payload.errors import FerryError

    processor, cfg = processor_and_config(
        tmp_path, "skip_prepare_dataset: true\nsequence_len: 30\n"
    )
    train, _, _ = vision.build(cfg, processor)
    with pytest.raises(FerryError, match=r"row 0: \d+ tokens with its pictures expanded, longer"):
        vision.VisionCollator(cfg, processor)([train[0]])
    processor, cfg = processor_and_config(tmp_path, "pad_to_sequence_len: true\n")
    train, _, _ = vision.build(cfg, processor)
    batch = vision.VisionCollator(cfg, processor)([train[0], train[4]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 256)
    assert batch["attention_mask"].shape == (2, 256)
    real = int(batch["attention_mask"][0].sum())
    assert (batch["labels"][0, real:] == -100).all()
    assert (batch["input_ids"][0, real:] == processor.tokenizer.pad_token_id).all()


def test_axolotls_transformers_4_lora_regex_is_read_with_todays_names(tmp_path):
    """Axolotl's VLM examples write `language_model.model.layers...`; transformers 5 names
    those modules `model.language_model.layers...`. The regex is read with today's names;
    one that matches nothing is refused showing a real name."""
    from payload.errors import FerryError
    from payload.model import load_model

    old = (
        r"language_model.model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"
    )
    processor, cfg = processor_and_config(tmp_path, f"lora_target_modules: '{old}'\n"
                                          "lora_target_linear: null\n")  # fmt: skip
    model = load_model(cfg, processor.tokenizer, head="AutoModelForImageTextToText")
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(lora) == 14 and all(".language_model.layers." in n for n in lora), sorted(lora)
    processor, cfg = processor_and_config(tmp_path, "lora_target_modules: 'nothing.here'\n"
                                          "lora_target_linear: null\n")  # fmt: skip
    with pytest.raises(FerryError, match=r"matches no module of .*such as `model\.language"):
        load_model(cfg, processor.tokenizer, head="AutoModelForImageTextToText")


def test_ddp_searches_for_unused_parameters_only_when_towers_train(tmp_path):
    """A tower's last norm never gets a gradient, so DDP must look for unused parameters
    when the towers train (a full fine-tune without freeze_mm_modules), unless told."""
    from payload.config.loader import load_config
    from payload.trainers.settings import find_unused

    def unused(extra: str) -> bool:
        return find_unused(load_config(vlm_config(tmp_path, extra)))

    assert unused("adapter: null\nfreeze_mm_modules: false\n") is True
    assert unused("adapter: null\nfreeze_mm_modules: true\n") is False
    assert unused("freeze_mm_modules: false\nddp_find_unused_parameters: false\n") is False
    assert unused("freeze_mm_modules: false\n") is False  # LoRA on the language model


@pytest.mark.slow
def test_a_full_fine_tune_with_frozen_towers_leaves_them_exactly_as_they_were(tmp_path):
    """A full fine-tune (no adapter) for 3 steps through the CLI with freeze_mm_modules:
    the saved model's vision tower and projector equal the base's, tensor for tensor; the
    language model's layers changed."""
    import torch
    from transformers import AutoModelForImageTextToText

    extra = "adapter: null\nmax_steps: 3\nlearning_rate: 0.001\nsave_total_limit: null\n"
    config = vlm_config(tmp_path, extra)
    launch("train", str(config), cwd=tmp_path, timeout=900, check=True)
    runs = json.loads(launch("runs", "--json", check=True).stdout)
    trained = AutoModelForImageTextToText.from_pretrained(runs[0]["output_dir"])
    base = dict(AutoModelForImageTextToText.from_pretrained(VLM).named_parameters())
    towers, language = 0, 0
    for name, param in trained.named_parameters():
        same = torch.equal(param.detach(), base[name].detach())
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert same, name
            towers += 1
        elif ".layers." in name and "language_model" in name:
            language += not same
    assert towers > 10 and language > 10, (towers, language)


@pytest.mark.slow
def test_two_gloo_ranks_train_a_vlm_with_its_towers_and_evaluate(tmp_path):
    """`launch train --gpus 2` (two CPU processes, DDP over gloo): a full fine-tune whose
    towers train (DDP must then look for their unused parameters) and an eval set held out
    with val_set_size, each rank batching its own share of the image rows."""
    extra = ("adapter: null\nfreeze_mm_modules: false\nmax_steps: 3\nlearning_rate: 0.001\n"
             "val_set_size: 8\neval_steps: 3\nsave_total_limit: null\n")  # fmt: skip
    config = vlm_config(tmp_path, extra)
    done = launch("train", str(config), "--gpus", "2", cwd=tmp_path, timeout=900, check=True)
    assert "| vision | full fine-tune |" in done.stdout and "2 x cpu (gloo)" in done.stdout
    assert "(52 train, 8 eval)" in done.stdout
    runs = json.loads(launch("runs", "--json", check=True).stdout)
    summary = json.loads((Path(runs[0]["output_dir"]) / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_eval_loss"] is not None, summary


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """`launch train examples/vision_lora.yml`, as the README says, once for the module."""
    home = tmp_path_factory.mktemp("vision-home")
    env = {"FERRY_HOME": str(home)}
    result = launch("train", str(EXAMPLE.relative_to(ROOT)), env=env, timeout=900, check=True)
    runs = json.loads(launch("runs", "--json", env=env, check=True).stdout)
    return result, env, runs[0], Path(runs[0]["output_dir"])


@pytest.mark.slow
def test_the_vision_example_trains_and_its_loss_falls(vision_run):
    result, _, _, out = vision_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] <= 0.8 * summary["first_loss"], summary
    assert "frozen: base_model.model.model.vision_tower, base_model.model.model." \
        "multi_modal_projector (freeze_mm_modules)" in result.stdout  # fmt: skip
    assert "| vision | lora |" in result.stdout
    assert "60 of 60 rows kept" in result.stdout


@pytest.mark.slow
def test_the_adapter_saves_with_the_processor_and_reloads(vision_run):
    """The adapter holds LoRA weights of the language model only; the processor is saved
    beside it; base + adapter reloaded gives other logits than the base alone, and the
    vision tower is the base's, tensor for tensor."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, _, _, out = vision_run
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("language_model" in k and "lora_" in k for k in weights), list(weights)
    assert (out / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.chat_template == (VLM / "chat_template.jinja").read_text()

    base = AutoModelForImageTextToText.from_pretrained(VLM).eval()
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(VLM), out)
    tuned.eval()
    row = rows_of([0])[0]
    from PIL import Image

    text = processor.apply_chat_template(row["messages"], tokenize=False)
    picture = Image.open(SHAPES.parent / row["images"][0])
    inputs = processor(text=[text], images=[[picture]], return_tensors="pt",
                       add_special_tokens=False)  # fmt: skip
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, tuned(**inputs).logits, atol=1e-3)
    original = dict(base.named_parameters())
    tower = {n: p for n, p in tuned.named_parameters() if "vision_tower" in n}
    assert tower
    for name, param in tower.items():
        assert param.detach().equal(original[name.replace("base_model.model.", "", 1)]), name


@pytest.mark.slow
def test_inference_answers_a_question_about_a_picture(vision_run):
    """`launch inference RUN --image PICTURE -p QUESTION`: the trained adapter answers in
    the trained form ("A ..." / "It is ...") and stops at the end of its turn."""
    _, env, record, _ = vision_run
    done = launch(
        "inference", record["run_id"], "--image", str(SHAPES.parent / "shapes" / "red_circle.png"),
        "-p", "What is in the picture?", "--json", "--max-new-tokens", "20", env=env,
        check=True,
    )  # fmt: skip
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert re.match(r"(A|It is) [a-z]+", answer["text"]), answer
    assert answer["new_tokens"] < 20  # stopped at <|im_end|>
    wrong = launch("inference", record["run_id"], "--image", "nowhere.png", "-p", "?", env=env)
    assert wrong.returncode != 0 and "--image: image file not found" in wrong.stderr


@pytest.mark.slow
def test_merge_keeps_the_processor_and_evaluate_says_what_it_cannot_do(vision_run, tmp_path):
    """launch merge-lora: the merged folder has the processor and loads as an
    image-text-to-text model; launch evaluate refuses a vision run, saying where its eval
    loss is."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, env, record, _ = vision_run
    dest = tmp_path / "merged"
    launch("merge-lora", record["run_id"], "--dest", str(dest), env=env, check=True)
    assert AutoProcessor.from_pretrained(dest).tokenizer.convert_tokens_to_ids("<image>") > 0
    assert type(AutoModelForImageTextToText.from_pretrained(dest)).__name__ == (
        "LlavaForConditionalGeneration"
    )
    done = launch("evaluate", record["run_id"], env=env)
    assert done.returncode != 0 and "does not read image chats yet" in done.stderr


def test_image_on_a_text_model_is_refused(quickstart_run):
    done = launch(
        "inference", quickstart_run.record["run_id"], "--image", "x.png", "-p", "hi",
        env={"FERRY_HOME": str(quickstart_run.home)},
    )  # fmt: skip
    assert done.returncode != 0
    assert "--image: this model reads text only" in done.stderr


# ---- remote jobs


def test_pictures_travel_with_a_remote_job_and_the_rows_load_there(tmp_path):
    """The example planned for Modal: its data file goes into a folder of its own with
    the 12 pictures its rows name, at the same relative paths; in a fresh process that has
    only the shipped files (copied as Modal mounts them), every row checks out. A picture
    named by an absolute path is refused at plan time."""
    from executors.modal import remote_config
    from launcher import api

    job, _ = api.prepare(EXAMPLE, cloud="modal", gpus="H100:1")
    remote_cfg, inputs = remote_config(job)
    (dataset,) = remote_cfg["datasets"]
    assert dataset["path"] == "/ferry/inputs/media-0/shapes.jsonl"
    pictures = {r: p for p, r in inputs if r.startswith("/ferry/inputs/media-0/shapes/")}
    assert len(pictures) == 12
    root = tmp_path / "container"
    for local, remote in inputs:
        target = root / remote.lstrip("/")
        if local.is_dir():
            import shutil

            shutil.copytree(local, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(local.read_bytes())
    config = dict(remote_cfg)
    config["base_model"] = str(root) + remote_cfg["base_model"]
    config["datasets"] = [{**dataset, "path": str(root) + dataset["path"]}]
    script = (
        "import json, sys\nfrom payload.config.loader import validate_mapping\n"
        "from payload.data import vision\nfrom payload.model import load_processor\n"
        f"cfg = validate_mapping(json.loads({json.dumps(json.dumps(config))}))\n"
        "_, _, report = vision.build(cfg, load_processor(cfg))\nprint(report.lines()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("60 of 60 rows kept"), done.stdout

    absolute = tmp_path / "abs.jsonl"
    row = rows_of([0])[0]
    row["images"] = [str(SHAPES.parent / row["images"][0])]
    absolute.write_text(json.dumps(row) + "\n")
    config = tmp_path / "abs.yml"
    config.write_text(
        EXAMPLE.read_text()
        .replace("base_model: assets/tiny-vlm", f"base_model: {VLM}")
        .replace("path: data/shapes.jsonl", f"path: {absolute}")
    )
    from payload.errors import FerryError

    job, _ = api.prepare(config, cloud="modal", gpus="H100:1")
    with pytest.raises(FerryError, match="by an absolute path, which the remote machine"):
        remote_config(job)

    # A picture found here only relative to the working folder would not travel.
    elsewhere = tmp_path / "data" / "rows.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_text(SHAPES.read_text())  # its `shapes/...` paths are not beside it
    config.write_text(config.read_text().replace(str(absolute), str(elsewhere)))
    job, _ = api.prepare(config, cloud="modal", gpus="H100:1")
    with pytest.raises(FerryError, match=r"names the picture shapes/red_circle.png, which is not"):
        remote_config(job)
