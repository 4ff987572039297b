"""The grammar processor on SmolLM2's real tokenizer, without Ray: it masks every token a
JSON schema forbids, and a matcher that stops (a refused token, one of llguidance's limits)
ends the answer with end-of-sequence instead of failing the request."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from transformers import AutoTokenizer

from mlx_orchard.engines.constrained import Grammars


@pytest.fixture(scope="module")
def grammars(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    return Grammars(tokenizer, 49152, [tokenizer.eos_token_id]), tokenizer


def test_only_tokens_that_continue_the_json_are_allowed(grammars):
    g, tok = grammars
    process = g.processor(g.grammar(json.dumps({"type": "object"})), prompt_len=3)
    out = process(mx.array([1, 2, 3]), mx.zeros((1, 49152)))
    allowed = [i for i, v in enumerate(out[0].tolist()) if v != float("-inf")]
    assert allowed and all(tok.decode([i]).lstrip().startswith("{") for i in allowed)


def test_a_matcher_that_stops_ends_the_answer(grammars):
    g, tok = grammars
    process = g.processor(g.grammar(json.dumps({"type": "object"})), prompt_len=3)
    refused = tok.encode("hello")[0]  # not a JSON object's start: the matcher goes into error
    out = process(mx.array([1, 2, 3, refused]), mx.zeros((1, 49160)))  # logits padded past the vocabulary
    allowed = [i for i, v in enumerate(out[0].tolist()) if v != float("-inf")]
    assert allowed == [tok.eos_token_id]
