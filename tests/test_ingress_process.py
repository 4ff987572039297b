"""The ingress replica of the running application loads no MLX: it reserves no CPU and may
be placed on any node, so it must start where MLX is not installed."""

from __future__ import annotations

import openai
import pytest

# A lambda, so Ray ships it by value (the replica need not import this test module).
_loaded_mlx_modules = lambda _replica: sorted(  # noqa: E731
    m for m in __import__("sys").modules if m.split(".")[0] in ("mlx", "mlx_lm", "mlx_whisper", "mlx_embeddings")
)


def test_the_ingress_replica_has_not_imported_mlx(client):
    import ray

    # Requests through every family first, so every router has done real work.
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    client.embeddings.create(model="all-minilm-l6-v2", input="hi", encoding_format="float")
    # And errors raised in model replicas, which the ingress unpickles (their classes too).
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-minilm-l6-v2", input="word " * 400, encoding_format="float")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt=[10**9], max_tokens=2)
    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::orchard#ingress#")
    ]
    ingress = ray.get_actor(name, namespace="serve")
    model_replica = next(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::orchard#llm#")
    )
    # The check itself can see MLX: in a model replica it finds it.
    assert ray.get(ray.get_actor(model_replica, namespace="serve").__ray_call__.remote(_loaded_mlx_modules), timeout=30)
    assert ray.get(ingress.__ray_call__.remote(_loaded_mlx_modules), timeout=30) == []
