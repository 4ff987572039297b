"""The optional API key, on a second (model-less) application beside the default one."""

from __future__ import annotations

import httpx
import openai
import pytest

KEY = "sk-orchard-test-key"


@pytest.fixture(scope="module")
def secured(serve_instance):
    from ray import serve

    from graph import build_app

    serve.run(build_app({"ingress": {"api_key": KEY}}), name="secured", route_prefix="/secured")
    yield f"{serve_instance}/secured"
    serve.delete("secured")


def test_v1_needs_the_bearer_key(secured):
    missing = httpx.get(f"{secured}/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.get(f"{secured}/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
    assert wrong.status_code == 401
    ok = httpx.get(f"{secured}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"] == []


def test_the_sdk_with_the_key_gets_through_and_without_is_refused(secured):
    good = openai.OpenAI(base_url=f"{secured}/v1", api_key=KEY, _strict_response_validation=True, max_retries=0)
    assert good.models.list().data == []
    bad = openai.OpenAI(base_url=f"{secured}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_health_stays_open(secured):
    assert httpx.get(f"{secured}/health").status_code == 200
