"""`launch inference`: the trained model completes prompts. Greedy unless a temperature
above 0 asks for sampling; the tokenizer's chat template wraps each prompt as one user
turn (with the assistant's turn opened) when it has one, unless raw text is asked for.
A vision-language model (`processor_type`) is asked about pictures: they go into the user
turn as image parts before the text, through the processor saved with the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from payload.errors import FerryError
from payload.posttrain import loading
from payload.posttrain.target import Target


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    chat_template: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise FerryError(f"--max-new-tokens must be 1 or more, not {self.max_new_tokens}.")
        if self.temperature < 0:
            raise FerryError(f"--temperature must be 0 (greedy) or more, not {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FerryError(f"--top-p must be in (0, 1], not {self.top_p}.")
        if self.top_k is not None and self.top_k < 1:
            raise FerryError(f"--top-k must be 1 or more, not {self.top_k}.")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise FerryError(
                "--top-p/--top-k shape sampling, and decoding is greedy at temperature 0.",
                hint="Add --temperature (e.g. 0.7) to sample.",
            )

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            # Explicit, so that a generation_config.json saved with the model that
            # turns sampling on does not apply.
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass
class Completion:
    prompt: str
    text: str  # the new tokens decoded, special tokens left out
    tokens: list[int]  # the new tokens' ids
    new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "tokens": self.tokens,
            "new_tokens": self.new_tokens,
        }


class Generator:
    """The trained model loaded once, completing one prompt after another."""

    def __init__(self, target: Target, sampling: Sampling):
        from payload.trainers import objective

        sampling.check()
        if (name := objective(target.cfg)) in ("reward", "process_reward"):
            kind = "one score a conversation" if name == "reward" else "a label a step"
            raise FerryError(
                f"{target.name} is a {name.replace('_', ' ')} model: it gives {kind}, it does "
                "not write text, so there is nothing for launch inference to generate.",
                hint="Load it with AutoModelForSequenceClassification (reward) or "
                "AutoModelForTokenClassification (process reward) to score text.",
            )
        loading.quiet()
        self.sampling = sampling
        self.processor = loading.processor(target) if target.cfg.processor_type else None
        if self.processor is not None:
            from payload.data.vision import Pictures

            self.tokenizer = self.processor.tokenizer
            self.pictures = Pictures(target.cfg, [Path.cwd()])  # image_size as in training
        else:
            self.tokenizer = loading.tokenizer(target)
        self.model = loading.trained_model(target, self.tokenizer)
        self.templated = sampling.chat_template and bool(self.tokenizer.chat_template)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids as the model sees them."""
        tok = self.tokenizer
        if self.templated:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            # The template writes the special tokens (BOS) itself.
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt)["input_ids"]

    def stop_ids(self) -> list[int]:
        """Generation ends at eos and, under a chat template, at its end-of-turn token
        (ChatML's <|im_end|>, say): the assistant's turn is over there."""
        from payload.data.templates import eot_token_for

        tok = self.tokenizer
        ids = [tok.eos_token_id]
        config = getattr(self.model, "generation_config", None)
        saved = getattr(config, "eos_token_id", None)
        ids += saved if isinstance(saved, list) else [saved]
        if self.templated and (eot := eot_token_for(tok.chat_template)):
            found = tok.convert_tokens_to_ids(eot)
            if isinstance(found, int) and found != tok.unk_token_id:
                ids.append(found)
        return list(dict.fromkeys(i for i in ids if isinstance(i, int)))

    def image_inputs(self, prompt: str, images: list[str]) -> dict[str, Any]:
        """The processor's inputs for a question about `images` (paths or URLs)."""
        from payload.data.core import BadRow

        if self.processor is None:
            raise FerryError(
                "--image: this model reads text only; pictures go to a vision-language "
                "model (a config with processor_type)."
            )
        try:
            pictures = [self.pictures.load(self.pictures.resolve(i)) for i in images]
        except BadRow as e:
            raise FerryError(f"--image: {e}") from e
        content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": prompt}]
        if not self.templated:
            raise FerryError(
                "--image needs the chat template, which places each picture's tokens.",
                hint="Leave out --no-chat-template.",
            )
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return dict(
            self.processor(
                text=[text],
                images=[pictures] if pictures else None,
                add_special_tokens=False,
                return_tensors="pt",
            )
        )

    def complete(
        self,
        prompt: str,
        stream: Callable[[str], None] | None = None,
        images: list[str] | None = None,
    ) -> Completion:
        """Complete `prompt` (about `images`, for a vision-language model); with `stream`,
        each piece of text goes to it as it is made."""
        import torch

        if images or (self.processor is not None and self.templated):
            inputs = self.image_inputs(prompt, list(images or []))
        else:
            ids = torch.tensor([self.prompt_ids(prompt)])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        prompt_length = inputs["input_ids"].shape[1]
        streamer = _Streamer(self.tokenizer, stream) if stream else None
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.stop_ids(),
                streamer=streamer,
                **self.sampling.generate_kwargs(),
            )
        new = out[0, prompt_length:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Completion(prompt, text, new, len(new))


def _Streamer(tokenizer: Any, write: Callable[[str], None]) -> Any:  # noqa: N802 - a class
    """transformers' TextStreamer, writing each finished piece of text to `write`
    (whole words: it holds back text until a space or newline ends it)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def prompts_from(lines: Iterable[str]) -> Iterable[str]:
    """Interactive prompts: one a line, blank lines skipped."""
    for line in lines:
        if text := line.rstrip("\n"):
            yield text
