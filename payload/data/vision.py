"""Image chats for vision-language models, through the model's processor.

A row is a conversation whose messages may hold OpenAI-style content parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`) and an `images` (or `image`)
column with one picture per image part that does not carry its own (`{"type": "image",
"image": ...}`, or `url` / `path`). A picture is a path (absolute, or relative to the data
file's folder, then to the working folder), an http(s) URL, a `data:` URI, a mapping with
`bytes` or `path` (a Hugging Face `Image` column), or a PIL image. Pictures are read with
Pillow, made RGB, and resized when `image_size` is set, as Axolotl does: a side makes a
square (the picture scaled to fit, aspect kept, padded black), [width, height] a plain
resize, both with `image_resize_algorithm` (default bilinear).

Labels: the conversation is rendered with the chat template and labelled exactly as the
text `chat_template` strategy labels it (payload.data.chat: roles_to_train,
train_on_inputs, train_on_eos/eot, ...), on the text where each image is still its one
placeholder token. The processor then expands each placeholder into the image's tokens
(and whatever its family writes around them); the two token sequences are aligned, and
only tokens of the template's own text keep a label: image tokens, the tokens the processor
adds, and padding never train.

Rows are checked when the run starts: bad ones (a missing or unreadable picture, more
image parts than pictures or fewer, nothing trained, longer than sequence_len once the
images are expanded) are skipped and counted by reason with the first one named, as for
text rows. Without `skip_prepare_dataset` every row is processed then (pictures decoded,
tokens expanded and labelled); with it, only what is cheap is checked (the conversation,
its template, the number of pictures and that each can be opened) and each batch is
processed as it is drawn. Pixel values are never stored: the collator runs the processor
on the batch, which lays out each family's pixel values and extra inputs (image grid
sizes, pixel masks, token types) as its model wants them. Rows are never packed.
"""

from __future__ import annotations

import base64
import difflib
import io
import logging
import urllib.request
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.chat import ChatTemplate
from payload.data.conversation import MEDIA, Conversation, Turn
from payload.data.core import IGNORE, BadRow, Context, marked
from payload.data.pictures import IMAGE_COLUMNS, INLINE_KEYS
from payload.data.report import DataReport
from payload.data.sources import load_rows, shard
from payload.errors import FerryError

log = logging.getLogger("ferry.data")

URL_TIMEOUT_S = 30
# Part types Ferry reads pictures for; audio and video parts are refused by name.
SUPPORTED_MEDIA = ("image",)


def media_token_ids(processor: Any) -> set[int]:
    """The ids of the tokens that stand for media: never trained."""
    tokenizer = processor.tokenizer
    ids = set()
    for name in ("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
                 "eoi_token_id", "image_start_token_id", "image_end_token_id"):  # fmt: skip
        value = getattr(processor, name, None)
        if isinstance(value, int):
            ids.add(value)
    for name in ("image_token", "video_token", "audio_token", "boi_token", "eoi_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str) and token:
            found = tokenizer.convert_tokens_to_ids(token)
            if isinstance(found, int) and found != tokenizer.unk_token_id:
                ids.add(found)
    return ids


# ---- pictures


class PictureError(BadRow):
    """A bad row counted under a general `reason` ("image file not found"), with what is
    particular to the row (which file) in `detail`, so that the report groups rows by
    reason and names the first one's file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


NOT_FOUND = "image file not found"
UNREADABLE = "image cannot be read"
TOO_FEW = "more image parts than pictures"
TOO_MANY = "more pictures than image parts"


def _resample(name: str | None) -> Any:
    from PIL import Image

    return {
        None: Image.Resampling.BILINEAR,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "nearest": Image.Resampling.NEAREST,
    }[name]


def describe(source: Any) -> str:
    """A picture's source, short, for an error (a URL without its query, which may hold a
    presigned signature)."""
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            return source.split("?", 1)[0]
        return source if len(source) <= 80 or not source.startswith("data:") else "a data: URI"
    if isinstance(source, dict):
        return str(source.get("path") or "an image given as bytes")
    return type(source).__name__


URL_ATTEMPTS = 3


def fetch(url: str) -> bytes:
    """A picture's bytes from a URL, fetched once per machine: kept under
    $FERRY_HOME/pictures by the URL's digest, so that every batch and epoch (and every rank)
    reads the copy. A failed request is tried again, URL_ATTEMPTS times in all."""
    import hashlib
    import os
    import time

    from payload.data.sources import data_home

    folder = data_home() / "pictures"
    kept = folder / hashlib.sha256(url.encode()).hexdigest()[:40]
    if kept.is_file():
        return kept.read_bytes()
    for attempt in range(URL_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
            break
        except OSError:
            if attempt == URL_ATTEMPTS - 1:
                raise
            time.sleep(2**attempt)
    folder.mkdir(parents=True, exist_ok=True)
    partial = kept.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(kept)  # whole or not at all, whoever writes it
    return data


class Pictures:
    """Finds, opens and resizes a row's pictures; `folders` are where relative paths are
    looked up, in order."""

    def __init__(self, cfg: TrainConfig, folders: list[Path]):
        self.size = cfg.image_size  # a side (padded square) or [width, height]
        self.resample = _resample(cfg.image_resize_algorithm)
        self.folders = folders

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        candidates = [path] if path.is_absolute() else [f / path for f in self.folders]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        where = " or ".join(dict.fromkeys(str(c.parent) for c in candidates))
        raise PictureError(NOT_FOUND, f"`{value}` (looked in {where})")

    def resolve(self, source: Any) -> Any:
        """The source with a relative path made absolute (so that a batch, drawn later
        and perhaps elsewhere, opens the same file)."""
        if isinstance(source, str) and not source.startswith(("data:", "http://", "https://")):
            return str(self.path(source))
        if isinstance(source, dict) and not source.get("bytes") and source.get("path"):
            return {**source, "path": str(self.path(source["path"]))}
        return source

    def raw(self, source: Any) -> Any:
        """A PIL image, opened (lazily: only its header is read) but not decoded."""
        from PIL import Image

        try:
            if isinstance(source, Image.Image):
                return source
            if isinstance(source, dict):
                if source.get("bytes"):
                    return Image.open(io.BytesIO(source["bytes"]))
                if source.get("path"):
                    return Image.open(self.path(source["path"]))
                raise PictureError(UNREADABLE, "a mapping with neither `bytes` nor `path`")
            if isinstance(source, bytes):
                return Image.open(io.BytesIO(source))
            if not isinstance(source, str) or not source:
                what = f"{type(source).__name__}, not a path, URL or bytes"
                raise PictureError(UNREADABLE, what)
            if source.startswith("data:"):
                return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
            if source.startswith(("http://", "https://")):
                return Image.open(io.BytesIO(fetch(source)))
            return Image.open(self.path(source))
        except BadRow:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow, urllib and base64 raise many kinds
            detail = f"`{describe(source)}`: {type(e).__name__}: {e}"
            raise PictureError(UNREADABLE, detail) from e

    def load(self, source: Any) -> Any:
        """The picture decoded, RGB, resized when `image_size` is set."""
        image = self.raw(source)
        try:
            image = image.convert("RGB")
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails here
            detail = f"`{describe(source)}`: {type(e).__name__}: {e}"
            raise PictureError(UNREADABLE, detail) from e
        if isinstance(self.size, int):  # as Axolotl: the aspect kept, padded black
            from PIL import ImageOps

            image = ImageOps.pad(image, (self.size, self.size), self.resample, color=(0, 0, 0))
        elif self.size:
            width, height = self.size
            image = image.resize((width, height), self.resample)
        return image


# ---- rows


@dataclass
class Prepared:
    """One checked row: the rendered text, its tokens before and (when processed) after
    the images are expanded, the labels, and the pictures' sources."""

    # Token lists are kept as int32 arrays: a list of Python ints costs about 9 times
    # the memory, on every rank, for every row of a large set.
    text: str
    ids: Sequence[int]  # the template's tokens, one placeholder per image
    labels: Sequence[int]  # for `ids`
    images: list[Any]
    where: str
    expanded: Sequence[int] | None = None  # the processor's tokens
    expanded_labels: Sequence[int] | None = None


class VisionChat(ChatTemplate):
    """The chat_template strategy on rows with content parts and pictures."""

    def __init__(self, ctx: Context, processor: Any, pictures: Pictures):
        super().__init__(ctx)
        ds = ctx.ds
        self.conversation = Conversation(ds, ctx.cfg, prefer_sharegpt=False, parts=True)
        self.processor = processor
        self.pictures = pictures
        self.media_ids = media_token_ids(processor)
        self.sequence_len = ctx.cfg.sequence_len

    def sources(self, row: dict[str, Any], turns: list[Turn], where: str = "") -> list[Any]:
        """The row's pictures in the order their parts come. A row with pictures and no
        media part at all gets one image part per picture at the start of its first user
        message, as Axolotl places them."""
        column = next((row[c] for c in IMAGE_COLUMNS if row.get(c) is not None), None)
        if column is None:
            given: list[Any] = []
        elif isinstance(column, (list, tuple)):
            given = list(column)
        else:
            given = [column]
        if given and not any(
            not isinstance(t.content, str) and any(p["type"] in MEDIA for p in t.content)
            for t in turns
        ):
            first = next((t for t in turns if t.role == "user"), None)
            if first is not None:
                text = [{"type": "text", "text": first.content}]
                rest = text if isinstance(first.content, str) else first.content
                first.content = [{"type": "image"} for _ in given] + rest
        out, used = [], 0
        for turn in turns:
            if isinstance(turn.content, str):
                continue
            for part in turn.content:
                kind = part["type"]
                if kind in MEDIA and kind not in SUPPORTED_MEDIA:
                    raise FerryError(
                        f"{where or self.where}: a message has a part of type `{kind}`; Ferry "
                        "trains on "
                        "images only so far (audio and video need their own loaders and "
                        "the processor's feature extractor).",
                        hint="Remove the audio/video rows, or train on images and text.",
                    )
                if kind != "image":
                    continue
                inline = next((part[k] for k in INLINE_KEYS if part.get(k)), None)
                if inline is not None:
                    out.append(inline)
                    continue
                if used < len(given):
                    out.append(given[used])
                used += 1
        if used != len(given):
            column = next((c for c in IMAGE_COLUMNS if row.get(c) is not None), IMAGE_COLUMNS[0])
            raise PictureError(
                TOO_FEW if used > len(given) else TOO_MANY,
                f"{used} image part(s) without a picture of their own, {len(given)} in `{column}`",
            )
        return out

    def check(self, row: dict[str, Any], where: str, decode: bool) -> Prepared:
        """The row labelled on its template text, its pictures found and opened (decoded
        and expanded by the processor too when `decode`)."""
        turns = self.conversation(row)
        sources = [self.pictures.resolve(s) for s in self.sources(row, turns, where)]
        tools = row.get("tools") if isinstance(row.get("tools"), list) else None
        text = self._render(turns, tools)
        spans = [self._span(text, turns, tools, i) for i in range(len(turns))]
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        base = self._labelled(turns, text, spans, ids, list(encoded["offset_mapping"]))
        if sources and not any(t in self.media_ids for t in ids):
            raise FerryError(
                f"{where}: the chat template wrote no image placeholder for this row's "
                f"{len(sources)} picture(s), so the model would never see them.",
                hint="Use the model's own template (`chat_template: tokenizer_default`, or the "
                "family's name such as qwen2_vl), or a Jinja template that writes the "
                "processor's image token for each image part.",
            )
        labels = [
            IGNORE if t in self.media_ids else x for t, x in zip(ids, base["labels"], strict=True)
        ]
        if all(x == IGNORE for x in labels):
            raise BadRow("nothing to train: only image tokens are labelled")
        prepared = Prepared(text, array("i", ids), array("i", labels), sources, where)
        if decode:
            images = [self.pictures.load(s) for s in sources]
            expanded = self.expand(text, images)
            prepared.expanded = array("i", expanded)
            prepared.expanded_labels = array("i", align(ids, labels, expanded, self.media_ids))
            if len(expanded) > self.sequence_len:
                raise BadRow(
                    "longer than sequence_len with its images expanded "
                    "(image rows are never truncated: the model needs every image token)"
                )
        else:
            for source in sources:
                self.pictures.raw(source)
        return prepared

    def expand(self, text: str, images: list[Any]) -> list[int]:
        """The processor's tokens for one row."""
        try:
            out = self.processor(
                text=[text], images=[images] if images else None, add_special_tokens=False
            )
        except Exception as e:  # noqa: BLE001 - processors raise ValueError, IndexError...
            raise BadRow(f"the processor rejected this row: {type(e).__name__}: {e}") from e
        ids = out["input_ids"][0]
        return [int(t) for t in ids]


def align(
    ids: Sequence[int], labels: Sequence[int], expanded: Sequence[int], media: set[int]
) -> list[int]:
    """Labels for `expanded` (the processor's tokens) from `labels` (for `ids`, the
    template's tokens): a token the two share keeps its label; one the processor wrote
    (image tokens, the markers around them) is not trained. A trained token the processor
    changed makes the row bad: its label could not be placed exactly.

    Runs of one media token are compared as one, so that an image's hundreds of tokens do
    not slow the alignment down."""
    runs: list[tuple[int, int]] = []  # (token, first position) per run in `expanded`
    for j, token in enumerate(expanded):
        if token in media and runs and runs[-1][0] == token and expanded[j - 1] == token:
            continue
        runs.append((token, j))
    compressed = [token for token, _ in runs]
    out = [IGNORE] * len(expanded)
    matched = [False] * len(ids)
    blocks = difflib.SequenceMatcher(None, ids, compressed, autojunk=False).get_matching_blocks()
    for a, b, size in blocks:
        for k in range(size):
            matched[a + k] = True
            token, j = runs[b + k]
            if token not in media:
                out[j] = labels[a + k]
    lost = [i for i, label in enumerate(labels) if label != IGNORE and not matched[i]]
    if lost:
        raise BadRow(
            f"the processor changed {len(lost)} trained token(s) of the template's text, "
            "so their labels cannot be placed"
        )
    return out


# ---- datasets


class VisionRows:
    """A list of checked rows, as the trainer's dataset; items are `Prepared`."""

    def __init__(self, rows: list[Prepared]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Prepared:
        return self.rows[i]


def _folders(ds: DatasetConfig) -> list[Path]:
    path = Path(ds.path).expanduser()
    out = []
    if path.is_file():
        out.append(path.parent)
    elif path.is_dir():
        out.append(path)
    out.append(Path.cwd())
    return out


def _undecoded(rows: Any) -> Any:
    """A Hugging Face dataset whose Image columns hand out {bytes, path} instead of
    decoding every picture when a row is read."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is part of the train extra
        return rows
    features = getattr(rows, "features", None) or {}
    for name in IMAGE_COLUMNS:
        feature = features.get(name)
        if isinstance(feature, datasets.Image) and feature.decode:
            rows = rows.cast_column(name, datasets.Image(decode=False))
        elif isinstance(
            feature, (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))
        ) and isinstance(getattr(feature, "feature", None), datasets.Image):
            rows = rows.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return rows


def check_dataset(
    key: str,
    index: int,
    ds: DatasetConfig,
    cfg: TrainConfig,
    processor: Any,
    report: DataReport,
) -> list[Prepared]:
    """One entry of `key` read, sharded and checked row by row."""
    where = f"{key}[{index}] ({ds.path})"
    if ds.type_name not in ("chat_template", "sharegpt"):
        raise FerryError(
            f"{where}: `type: {ds.type}` cannot carry images; a vision-language run reads "
            "chats (`type: chat_template`) whose messages have image parts."
        )
    rows = _undecoded(load_rows(ds, where, report=report, strict=cfg.strict))
    rows, offset = shard(rows, ds.shards, ds.shards_idx)
    ctx = Context(processor.tokenizer, ds, cfg)
    chat = VisionChat(ctx, processor, Pictures(cfg, _folders(ds)))
    decode = not cfg.skip_prepare_dataset
    out = []
    for i, row in enumerate(rows):
        report.rows_in += 1
        at = f"{where} row {offset + i}"
        try:
            out.append(chat.check(dict(row), at, decode))
        except BadRow as e:
            if cfg.strict:
                raise FerryError(f"{at}: {e} (strict: true stops at the first bad row)") from e
            if isinstance(e, PictureError):
                report.skip(e.reason, f"{at}, {e.detail}")
            else:
                report.skip(str(e), at)
            continue
        report.rows_kept += 1
    return out


def build(cfg: TrainConfig, processor: Any) -> tuple[VisionRows, VisionRows | None, DataReport]:
    """(train, eval or None, report) for a run with `processor_type`."""
    import random

    report = DataReport()
    train: list[Prepared] = []
    for i, ds in enumerate(cfg.datasets):
        train += check_dataset("datasets", i, ds, cfg, processor, report)
    if not train:
        reasons = [f"{n} {reason}" for reason, n in report.skipped.most_common()]
        raise FerryError("No usable rows in any dataset: " + ("; ".join(reasons) or "all empty"))
    if len(cfg.datasets) > 1 and cfg.shuffle_merged_datasets:
        random.Random(cfg.seed).shuffle(train)
    evals: list[Prepared] | None = None
    if cfg.test_datasets:
        evals = []
        for i, ds in enumerate(cfg.test_datasets):
            evals += check_dataset("test_datasets", i, ds, cfg, processor, report)
        if not evals:
            raise FerryError("test_datasets: no usable rows: see the skipped rows above.")
    elif cfg.val_set_size:
        size = cfg.val_set_size
        count = int(size) if size >= 1 else max(1, round(size * len(train)))
        if count >= len(train):
            raise FerryError(
                f"val_set_size: {count} rows leaves nothing to train on ({len(train)} rows)."
            )
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[:count])
        evals = [r for k, r in enumerate(train) if k in held]
        train = [r for k, r in enumerate(train) if k not in held]
    if cfg.dataset_prepared_path:
        report.notes.append(
            "dataset_prepared_path: image-chat rows are checked when each run starts and "
            "not cached: their pictures live outside the data files the cache key covers"
        )
    if cfg.skip_prepare_dataset:
        report.notes.append(
            "skip_prepare_dataset: rows were checked (conversation, template, pictures "
            "found); each batch is processed as it is drawn"
        )
    report.train_rows = len(train)
    report.eval_rows = len(evals or [])
    report.tokens = sum(len(r.expanded or r.ids) for r in [*train, *(evals or [])])
    return VisionRows(train), (VisionRows(evals) if evals is not None else None), report


# ---- batches


class VisionCollator:
    """Batches of `Prepared` rows: the processor lays out the batch (padded on the right,
    pixel values and the family's extra inputs), and the labels come from each row's
    alignment; padding and image tokens are -100."""

    def __init__(self, cfg: TrainConfig, processor: Any):
        self.processor = processor
        self.pictures = Pictures(cfg, [])  # checked rows hold absolute paths
        self.media_ids = media_token_ids(processor)
        self.sequence_len = cfg.sequence_len
        self.pad_to = cfg.sequence_len if cfg.pad_to_sequence_len else None

    def __call__(self, rows: list[Prepared]) -> dict[str, Any]:
        import torch

        images = [[self._load(row, s) for s in row.images] for row in rows]
        texts = [row.text for row in rows]
        kwargs: dict[str, Any] = {"padding": "longest", "return_tensors": "pt"}
        tokenizer = self.processor.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            batch = self.processor(
                text=texts,
                images=images if any(images) else None,
                add_special_tokens=False,
                **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - say which rows
            names = ", ".join(r.where for r in rows)
            raise FerryError(f"the processor failed on a batch of {names}: {e}") from e
        finally:
            tokenizer.padding_side = side
        ids = batch["input_ids"]
        lengths = [int(n) for n in batch["attention_mask"].sum(dim=1)]
        for row, n in zip(rows, lengths, strict=True):
            if n > self.sequence_len:  # only unchecked rows (skip_prepare_dataset) get here
                raise FerryError(
                    f"{row.where}: {n} tokens with its pictures expanded, longer than "
                    f"sequence_len ({self.sequence_len}); image rows are never cut.",
                    hint="Raise sequence_len, shrink the pictures (image_size), or run "
                    "without skip_prepare_dataset so that such rows are counted and skipped "
                    "before training.",
                )
        if self.pad_to and ids.shape[1] < self.pad_to:
            batch = _padded(dict(batch), ids.shape[1], self.pad_to, tokenizer.pad_token_id)
            ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE)
        for r, row in enumerate(rows):
            n = lengths[r]
            expanded = [int(t) for t in ids[r, :n]]
            if row.expanded is not None and array("i", expanded) != row.expanded:
                raise FerryError(
                    f"{row.where}: the processor gave this row other tokens in a batch than "
                    "when it was checked; the labels would not line up."
                )
            try:
                row_labels = row.expanded_labels or align(
                    row.ids, row.labels, expanded, self.media_ids
                )
            except BadRow as e:
                raise FerryError(f"{row.where}: {e}") from e
            labels[r, :n] = torch.tensor(list(row_labels), dtype=labels.dtype)
        out = dict(batch)
        out["labels"] = labels
        return out

    def _load(self, row: Prepared, source: Any) -> Any:
        try:
            return self.pictures.load(source)
        except BadRow as e:
            raise FerryError(f"{row.where}: {e}") from e


def _padded(batch: dict[str, Any], length: int, to: int, pad_id: int) -> dict[str, Any]:
    """`pad_to_sequence_len`: every per-token tensor (as wide as input_ids) padded on the
    right to `to`: ids with the pad token, masks and token types with 0."""
    import torch

    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == length:
            fill = pad_id if key == "input_ids" else 0
            value = torch.nn.functional.pad(value, (0, to - length), value=fill)
        out[key] = value
    return out


def debug_rows(dataset: VisionRows, processor: Any, rows: int = 5) -> list[str]:
    """`debug: true`: the first rows' template text with the trained tokens between [[ ]]
    (each image is its one placeholder here; the processor expands it)."""
    lines = []
    for i in range(min(rows, len(dataset))):
        row = dataset[i]
        text, trained = marked(row.ids, row.labels, processor.tokenizer)
        count = len(row.expanded) if row.expanded is not None else len(row.ids)
        lines.append(
            f"row {i} ({count} tokens, {len(row.images)} image(s), {trained} trained): {text!r}"
        )
    return lines
