"""The bundled tiny model and tokenizer are exactly what their build script produces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ASSETS


@pytest.mark.slow
def test_build_assets_reproduces_the_checked_in_files(tmp_path):
    from safetensors.torch import load_file

    subprocess.run(
        [sys.executable, str(ASSETS / "build_assets.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for folder in ("tiny-tokenizer", "tiny-llama"):
        built = json.loads((tmp_path / folder / "tokenizer.json").read_text())
        shipped = json.loads((ASSETS / folder / "tokenizer.json").read_text())
        assert built == shipped, f"{folder}/tokenizer.json differs from a fresh build"
    built = load_file(tmp_path / "tiny-llama" / "model.safetensors")
    shipped = load_file(ASSETS / "tiny-llama" / "model.safetensors")
    assert built.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert built[name].equal(tensor), name
    params = sum(t.numel() for t in shipped.values())
    assert 0.5e6 < params < 1.5e6, params


def test_tiny_tokenizer_round_trips_and_has_chatml():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    text = "Convert 20 C to Fahrenheit: 68 F."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
