"""A chat row's messages as turns: the message transform before the template.

Reads the message list (`field_messages`; else `messages`, else the legacy ShareGPT
`conversations`), maps each message's keys (`message_property_mappings`, the legacy
`message_field_role`/`message_field_content`, or per message `role`/`content` with
`from`/`value` as the ShareGPT fallback), maps role names (`roles`), reads each
message's reasoning trace (`field_thinking`, handed to the template under
`template_thinking_key`; both default to `reasoning_content`), and applies the
system-message settings. Every problem with a row is a BadRow naming the field and the
message, counting messages from 0 as they appear in the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from payload.config.schema import DatasetConfig, TrainConfig
from payload.data.core import BadRow, Row, kind, list_field

# The message key of a reasoning trace, in rows and in templates (Qwen3's, DeepSeek-R1's).
THINKING = "reasoning_content"
# transformers hands a message's trace to the template under each of these names, from
# whichever one the message has (reasoning_content first); so unless `field_thinking`
# says otherwise, a trace under any of them is read as the trace (and labelled as one).
THINKING_NAMES = (THINKING, "thinking", "reasoning")

# Role names rows use -> the template's; `roles:` adds to (or overrides) these.
DEFAULT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}


@dataclass
class Turn:
    """One message as the template sees it, plus how the row asks to train on it:
    `train` (message_field_training) and `detail` (message_field_training_detail:
    character spans of `content`, `end_offset` inclusive). `thinking` is the message's
    reasoning trace, which the template reads under `thinking_key`."""

    role: str
    content: str | list[dict[str, Any]]  # a list: content parts (multimodal rows)
    train: bool | None = None
    detail: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    thinking: str | None = None
    thinking_key: str = THINKING

    def message(self, content: str | None = None, thinking: str | None = None) -> dict[str, Any]:
        """The template's message, optionally with other content or another reasoning
        trace (see chat.py)."""
        message = {
            **self.extra,
            "role": self.role,
            "content": self.content if content is None else content,
        }
        if self.thinking is not None:
            message[self.thinking_key] = self.thinking if thinking is None else thinking
        return message


def role_map(roles: dict[str, list[str]] | None) -> dict[str, str]:
    """Row role name -> template role; each template role also maps to itself."""
    mapping = dict(DEFAULT_ROLES)
    for target, names in (roles or {}).items():
        mapping[target] = target
        mapping.update(dict.fromkeys(names, target))
    return mapping


class Conversation:
    """Turns a row into `list[Turn]`; built once per dataset."""

    def __init__(
        self,
        ds: DatasetConfig,
        cfg: TrainConfig,
        *,
        prefer_sharegpt: bool = False,
        parts: bool = False,
    ):
        # `parts`: a message's content may be a list of OpenAI-style parts (payload.data.
        # vision), each {"type": "text", "text": ...} or a media part ({"type": "image"}).
        self.parts = parts
        order = ("conversations", "messages") if prefer_sharegpt else ("messages", "conversations")
        self.fields = (ds.field_messages,) if ds.field_messages else order
        keys = dict(ds.message_property_mappings or {})
        if ds.message_field_role:
            keys["role"] = ds.message_field_role
        if ds.message_field_content:
            keys["content"] = ds.message_field_content
        # No mapping: each message is read as {role, content}, else ShareGPT's {from, value}.
        self.keys = keys or None
        # The template's name for the trace; the row's is `field_thinking`, else what
        # message_property_mappings maps that name from, else THINKING_NAMES.
        self.thinking_key = ds.template_thinking_key or THINKING
        source = ds.field_thinking or keys.get(self.thinking_key)
        self.thinking_sources = (source,) if source else THINKING_NAMES
        self.roles = role_map(ds.roles)
        self.train_key = ds.message_field_training
        self.detail_key = ds.message_field_training_detail
        self.system_key = ds.field_system or "system"
        self.drop_system = bool(ds.drop_system_message)
        self.default_system = cfg.default_system_message

    def __call__(self, row: Row) -> list[Turn]:
        name = next((f for f in self.fields if row.get(f) is not None), self.fields[0])
        turns = [self.turn(i, m) for i, m in enumerate(list_field(row, name))]
        system = row.get(self.system_key)
        if isinstance(system, str) and system and not (turns and turns[0].role == "system"):
            turns.insert(0, Turn("system", system))
        if self.drop_system:
            turns = [t for t in turns if t.role != "system"]
        if self.default_system and not (turns and turns[0].role == "system"):
            turns.insert(0, Turn("system", self.default_system))
        if not turns:
            raise BadRow(f"field `{name}` has only system messages (drop_system_message)")
        return turns

    def _keys(self, message: dict[str, Any]) -> dict[str, str]:
        if self.keys is not None:
            return {"role": "role", "content": "content", **self.keys}
        sharegpt = message.get("role") is None and message.get("from") is not None
        return (
            {"role": "from", "content": "value"}
            if sharegpt
            else {"role": "role", "content": "content"}
        )

    def turn(self, i: int, message: Any) -> Turn:
        if not isinstance(message, dict):
            raise BadRow(f"message {i} is {kind(message)}, not a mapping")
        keys = self._keys(message)
        role_key, content_key = keys["role"], keys["content"]
        role = message.get(role_key)
        if role is None:
            raise BadRow(f"message {i} has no `{role_key}`")
        if role not in self.roles:
            raise BadRow(f"unknown role `{role}` in message {i} (map it under `roles:`)")
        content = message.get(content_key)
        if content is None:
            raise BadRow(f"message {i} has no `{content_key}`")
        if self.parts and isinstance(content, list):
            content = _parts(i, content_key, content)
        elif not isinstance(content, str):
            what = "text or a list of parts" if self.parts else "text"
            raise BadRow(f"message {i} `{content_key}` is {kind(content)}, not {what}")
        turn = Turn(self.roles[role], content, thinking_key=self.thinking_key)
        source = next((k for k in self.thinking_sources if message.get(k) is not None), None)
        if source is not None:
            thinking = message[source]
            if not isinstance(thinking, str):
                raise BadRow(f"message {i} `{source}` is {kind(thinking)}, not text")
            turn.thinking = thinking
        used = {role_key, content_key, self.train_key, self.detail_key, *self.thinking_sources}
        for prop, source in keys.items():
            if (
                prop not in ("role", "content", self.thinking_key)
                and message.get(source) is not None
            ):
                turn.extra[prop] = message[source]
                used.add(source)
        for key, value in message.items():
            if key not in used and value is not None:
                turn.extra.setdefault(key, value)
        if self.train_key and message.get(self.train_key) is not None:
            train = message[self.train_key]
            if not isinstance(train, bool):
                raise BadRow(f"message {i} `{self.train_key}` is {kind(train)}, not true/false")
            turn.train = train
        if self.detail_key and message.get(self.detail_key) is not None:
            if not isinstance(turn.content, str):
                raise BadRow(f"message {i}: `{self.detail_key}` needs text content, not parts")
            turn.detail = _detail(i, self.detail_key, message[self.detail_key])
        return turn


# Media part types a template may place; their data comes from the row (payload.data.vision).
MEDIA = ("image", "audio", "video")


def _parts(i: int, key: str, content: list[Any]) -> list[dict[str, Any]]:
    """A message's content parts, checked: each a mapping with a `type`, text parts with
    their text. Keys a columnar reader filled with nulls (a text part's `image: null`)
    are dropped, so a template sees the parts as written."""
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRow(f"message {i} `{key}` part {j} is {kind(part)}, not a mapping")
        part = {k: v for k, v in part.items() if v is not None}
        kind_of = part.get("type")
        if kind_of == "text":
            if not isinstance(part.get("text"), str):
                raise BadRow(f"message {i} `{key}` part {j} is a text part without text")
        elif kind_of not in MEDIA:
            raise BadRow(
                f"message {i} `{key}` part {j} has type {kind_of!r}, not text, " + ", ".join(MEDIA)
            )
        out.append(part)
    return out


def _detail(i: int, key: str, spans: Any) -> list[dict[str, Any]]:
    """Validated training-detail spans: [{begin_offset, end_offset, train}]."""
    if not isinstance(spans, list):
        raise BadRow(f"message {i} `{key}` is {kind(spans)}, not a list")
    for j, span in enumerate(spans):
        ok = (
            isinstance(span, dict)
            and all(isinstance(span.get(k), int) for k in ("begin_offset", "end_offset"))
            and isinstance(span.get("train"), bool)
        )
        if not ok:
            raise BadRow(
                f"message {i} `{key}` item {j} needs integer `begin_offset` and `end_offset` "
                "and a true/false `train`"
            )
    return spans
