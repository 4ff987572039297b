"""Vision-language models through real Serve and the OpenAI SDK (issue #12).

One Serve app for the module: the tiny random-weight SmolVLM (tests/vlm_model.py) twice in
the vision pool, once with its caches (prefix cache, encoder cache) and once with none
(the reference answers); its ingress fetches from private networks, so a real local HTTP
server can serve images. A second, small app keeps the default guard on. Reference
answers also come from mlx-vlm's own ``stream_generate`` in this process: the server must
compute exactly what the model computes, image by image.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest
from PIL import Image, ImageDraw

from tests.conftest import default_args, replica_stats
from tests.http_files import serve_files
from tests.vlm_model import CHAT_TEMPLATE, IMAGE_TOKENS

APP, GUARDED = "vlm", "vlm-guarded"
VLM, FRESH = "tiny-vlm", "tiny-vlm-fresh"
MAX_TOKENS = 10


def picture(colour, size=(96, 72), mark=None) -> Image.Image:
    image = Image.new("RGB", size, colour)
    if mark is not None:  # a shape, so two pictures differ in more than their mean
        ImageDraw.Draw(image).ellipse(mark, fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    return image


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def data_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(encoded(image, fmt, **save)).decode()}"


RED = picture((220, 30, 30), mark=(10, 10, 40, 40))
BLUE = picture((30, 40, 220), mark=(50, 20, 90, 70))
GREEN = picture((30, 200, 60))


def vision_message(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def image_server():
    routes = {"/red.png": (200, encoded(RED)),
              "/big.png": (200, encoded(picture((1, 2, 3), size=(600, 600))) + b"\0" * 200_000)}
    with serve_files(routes) as url:
        yield url


@pytest.fixture(scope="module")
def app(serve_instance, tiny_vlm_dir):
    from ray import serve

    from graph import build_app

    args = default_args()
    common = {"source": str(tiny_vlm_dir), "kv_cache_gb": 0.1, "max_batch_size": 16}
    config = {
        "ingress": {**args["ingress"], "images": {"allow_private_networks": True, "max_image_mb": 0.1}},
        "runtime": args["runtime"],
        "pools": {"vlm": {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}}},
        "vlm": [{"name": VLM, **common},
                {"name": FRESH, **common, "prefix_cache_size": 0, "image_cache_size": 0}],
    }
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_instance}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def sdk(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key="unused", _strict_response_validation=True, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir):
    """Greedy answers of mlx-vlm's own generate loop, in this process: (text, prompt tokens)."""
    import mlx_vlm
    from mlx_vlm import stream_generate

    model, processor = mlx_vlm.load(str(tiny_vlm_dir))
    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    cache: dict = {}

    def answer(text: str, *images: Image.Image) -> tuple[str, int]:
        key = (text, *(i.tobytes() for i in images))
        if key not in cache:
            parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                   add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
            ids = processor(text=[prompt], images=[list(images)] if images else None)["input_ids"]
            tokens = []
            for r in stream_generate(model, processor, prompt, image=list(images) or None, max_tokens=MAX_TOKENS,
                                     temperature=0.0):
                if r.token == eos:
                    break
                tokens.append(r.token)
            cache[key] = (tokenizer.decode(tokens[:MAX_TOKENS], skip_special_tokens=True), ids.shape[1])
        return cache[key]

    return answer


def stats(handle_loop, model: str) -> dict:
    return vars(replica_stats(handle_loop, APP, "vlm", model))


def ask(sdk: openai.OpenAI, model: str, text: str, *urls: str, **kwargs):
    return sdk.chat.completions.create(model=model, messages=vision_message(text, *urls), max_tokens=MAX_TOKENS,
                                       temperature=0, **kwargs)


def test_an_image_is_decoded_placed_counted_and_answered_as_the_model_would(sdk, reference):
    text, prompt_tokens = reference("What is in this picture?", RED)
    reply = ask(sdk, VLM, "What is in this picture?", data_url(RED))
    assert reply.choices[0].message.content == text
    # the processor's whole expansion of the image (its 16 image tokens and their markers) is counted
    assert reply.usage.prompt_tokens == prompt_tokens > IMAGE_TOKENS + 3

    stream = sdk.chat.completions.create(model=VLM, messages=vision_message("What is in this picture?", data_url(RED)),
                                         max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_two_images_in_one_message_and_in_a_conversation(sdk, reference):
    text, prompt_tokens = reference("Compare them.", RED, BLUE)
    reply = ask(sdk, VLM, "Compare them.", data_url(RED), data_url(BLUE))
    assert reply.choices[0].message.content == text and reply.usage.prompt_tokens == prompt_tokens
    # swapping them changes the answer: each image's features land at its own place
    swapped = ask(sdk, FRESH, "Compare them.", data_url(BLUE), data_url(RED))
    assert swapped.choices[0].message.content == reference("Compare them.", BLUE, RED)[0] != text


def test_the_same_text_with_different_images_never_reuses_the_other_images_cache(sdk, reference):
    answers = {}
    for name, image in (("red", RED), ("blue", BLUE), ("green", GREEN), ("red again", RED)):
        cached = ask(sdk, VLM, "Describe the image.", data_url(image))
        fresh = ask(sdk, FRESH, "Describe the image.", data_url(image))
        assert cached.choices[0].message.content == fresh.choices[0].message.content == reference("Describe the image.", image)[0]
        answers[name] = cached.choices[0].message.content
    assert len({answers["red"], answers["blue"], answers["green"]}) == 3  # the images matter to this model
    assert answers["red again"] == answers["red"]


def test_a_conversation_about_one_image_encodes_it_once(sdk, handle_loop):
    image = picture((90, 160, 40), mark=(5, 30, 60, 60))
    before = stats(handle_loop, VLM)
    messages = vision_message("What do you see?", data_url(image))
    hits = []
    # the same pixels re-sent each turn, in other lossless encodings
    for turn, url in enumerate([data_url(image), data_url(image, "WEBP", lossless=True), data_url(image)]):
        messages[0]["content"][0]["image_url"]["url"] = url
        reply = sdk.chat.completions.create(model=VLM, messages=messages, max_tokens=4, temperature=0)
        hits.append(reply.usage.prompt_tokens_details.cached_tokens)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"And then, turn {turn}?"}]
    after = stats(handle_loop, VLM)
    assert after["images_encoded"] - before["images_encoded"] == 1
    assert hits[0] < IMAGE_TOKENS and all(h > IMAGE_TOKENS for h in hits[1:])  # later turns reuse the image's prefix

    # The image after other text: no cached prefix reaches it, so it is prefilled again,
    # from the encoder cache's features.
    for lead in ("Look at this:", "And now this one:"):
        content = [{"type": "text", "text": lead}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
        sdk.chat.completions.create(model=VLM, messages=[{"role": "user", "content": content}], max_tokens=2, temperature=0)
    again = stats(handle_loop, VLM)
    assert again["images_encoded"] == after["images_encoded"]  # same pixels: no new encoder pass
    assert again["image_cache_hits"] - after["image_cache_hits"] == 2


def test_concurrent_vision_and_text_requests_share_the_batch_and_keep_their_answers(sdk, handle_loop):
    jobs = [("Describe the image.", RED), ("Describe the image.", BLUE), ("What colour is it?", GREEN),
            ("Tell me a story.", None), ("Name three fruits.", None), ("What colour is it?", RED)]

    def run(job):
        text, image = job
        urls = [data_url(image)] if image is not None else []
        return ask(sdk, VLM, text, *urls).choices[0].message.content

    alone = [run(job) for job in jobs]
    before = stats(handle_loop, VLM)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    after = stats(handle_loop, VLM)
    assert together == alone
    generated = after["generated_tokens"] - before["generated_tokens"]
    steps = after["steps"] - before["steps"]
    assert len(jobs) <= generated <= len(jobs) * MAX_TOKENS
    assert steps < generated  # steps carried several sequences at once


def test_n_logprobs_stop_and_structured_output_work_with_images(sdk, reference):
    text, _ = reference("What is in this picture?", RED)
    reply = ask(sdk, VLM, "What is in this picture?", data_url(RED), n=2, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in reply.choices] == [text, text]
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens // 2
    stop = text.split()[1] if len(text.split()) > 1 else text[2:4]
    cut = ask(sdk, VLM, "What is in this picture?", data_url(RED), stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
    assert text.startswith(cut.choices[0].message.content)
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    shaped = sdk.chat.completions.create(
        model=VLM, messages=vision_message("Which colour? Answer in JSON.", data_url(BLUE)), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    assert set(json.loads(shaped.choices[0].message.content)) == {"colour"}


def test_responses_input_image_and_a_follow_up_turn(sdk, reference):
    text, prompt_tokens = reference("What is in this picture?", RED)
    first = sdk.responses.create(model=VLM, max_output_tokens=MAX_TOKENS, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": data_url(RED), "detail": "auto"},
                                    {"type": "input_text", "text": "What is in this picture?"}]}])
    assert first.output_text == text and first.usage.input_tokens == prompt_tokens
    follow = sdk.responses.create(model=VLM, max_output_tokens=4, temperature=0, previous_response_id=first.id,
                                  input="And the colour?")
    assert follow.usage.input_tokens > prompt_tokens  # the image is still in the conversation
    assert follow.usage.input_tokens_details.cached_tokens >= prompt_tokens - 1


def test_anthropic_messages_take_image_blocks(app, reference):
    text, prompt_tokens = reference("What is in this picture?", RED)
    client = anthropic.Anthropic(base_url=app, api_key="unused", max_retries=0, _strict_response_validation=True)
    data = base64.b64encode(encoded(RED)).decode()
    message = client.messages.create(model=VLM, max_tokens=MAX_TOKENS, extra_body={"temperature": 0}, messages=[{
        "role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                                    {"type": "text", "text": "What is in this picture?"}]}])
    assert message.content[0].text == text and message.usage.input_tokens == prompt_tokens


def test_images_over_http_within_limits(sdk, reference, image_server):
    text, _ = reference("What is in this picture?", RED)
    assert ask(sdk, VLM, "What is in this picture?", f"{image_server}/red.png").choices[0].message.content == text
    for url, says in ((f"{image_server}/missing.png", "HTTP 404"), (f"{image_server}/big.png", "larger than")):
        with pytest.raises(openai.BadRequestError) as bad:
            ask(sdk, VLM, "What is in this picture?", url)
        assert says in bad.value.message


@pytest.mark.parametrize("url, says", [
    ("data:image/png;base64," + base64.b64encode(b"this is no picture").decode(), "could not be decoded"),
    ("data:text/plain;base64,aGVsbG8=", "data:image/"),
    ("data:image/png;base64,@@@", "base64"),
    ("ftp://example.com/a.png", "data: or http(s)"),
    ("data:image/png;base64," + base64.b64encode(b"\0" * 120_000).decode(), "larger than"),
])
def test_bad_images_are_400s_that_say_why(sdk, url, says):
    with pytest.raises(openai.BadRequestError) as bad:
        ask(sdk, VLM, "What is in this picture?", url)
    assert says in bad.value.message and bad.value.param == "messages"


def test_an_image_on_a_text_only_model_is_a_400_that_says_so(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", messages=vision_message("Hi", data_url(RED)), max_tokens=2)
    assert "text-only model" in bad.value.message and "smollm2" in bad.value.message


def test_the_private_network_guard_is_on_by_default(serve_instance, tiny_vlm_dir, image_server):
    from ray import serve

    from graph import build_app

    args = default_args()
    config = {"ingress": args["ingress"], "runtime": args["runtime"],
              "pools": {"vlm": {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}}},
              "vlm": [{"name": VLM, "source": str(tiny_vlm_dir), "kv_cache_gb": 0.05}]}
    serve.run(build_app(config), name=GUARDED, route_prefix=f"/{GUARDED}")
    try:
        guarded = openai.OpenAI(base_url=f"{serve_instance}/{GUARDED}/v1", api_key="unused", max_retries=0, timeout=60)
        for url in (f"{image_server}/red.png", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x.png",
                    "http://10.0.0.1/x.png"):
            with pytest.raises(openai.BadRequestError) as bad:
                ask(guarded, VLM, "What is in this picture?", url)
            assert "private or reserved address" in bad.value.message
    finally:
        serve.delete(GUARDED)


def test_hostile_image_requests_leave_the_others_unchanged(sdk, reference):
    text, _ = reference("What is in this picture?", RED)
    bad = [
        vision_message("What is in this picture?", *[data_url(GREEN)] * 17),  # over ingress.images.max_images
        vision_message("Explain the <image> tag.", data_url(RED)),  # a placeholder token typed as text
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(RED), "detail": "huge"}}]}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
    ]

    def good():
        return ask(sdk, VLM, "What is in this picture?", data_url(RED)).choices[0].message.content

    def hostile(messages):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(model=VLM, messages=messages, max_tokens=MAX_TOKENS)
        return refused.value.message

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good) for _ in range(3)]
        refusals = list(pool.map(hostile, bad))
    assert [g.result() for g in goods] == [text] * 3
    assert "at most 16 images" in refusals[0] and "image tokens for 1 images" in refusals[1]
    assert "not supported" in refusals[3]
