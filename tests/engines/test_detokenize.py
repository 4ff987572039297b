"""Incremental detokenization with SmolLM2's real tokenizer: deltas concatenate exactly."""

import pytest
from transformers import AutoTokenizer

from mlx_orchard.engines.detokenize import IncrementalDetokenizer

TEXTS = [
    "The capital of France is Paris.",
    " leading space, double  spaces and a\nnewline",
    "naïve café 東京 🍎🍏 — ünïcödé",
    "def f(x):\n    return x ** 2  # indented code",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    # A multi-byte character is never split: no delta carries a replacement character.
    assert not any("\ufffd" in d for d in deltas)


def test_emoji_spanning_several_tokens_arrives_whole(tokenizer):
    ids = tokenizer.encode("🍎")
    assert len(ids) > 1  # byte-level BPE splits the emoji's four bytes
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🍎"


@pytest.mark.parametrize("rust", [True, False], ids=["decode-stream", "python-window"])
def test_both_paths_give_the_same_deltas(tokenizer, rust):
    class PythonOnly:  # the same tokenizer without its Rust backend: the Python window path
        decode = tokenizer.decode

    ids = tokenizer.encode(" ".join(TEXTS) + " 🍎")
    detok = IncrementalDetokenizer(tokenizer if rust else PythonOnly())
    assert (detok._stream is not None) == rust
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
