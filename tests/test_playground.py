"""The playground page at ``/`` in a real headless browser (Debian's chromium, driven by
Selenium) against a real Serve app with the default models behind an API key: what the page
shows is what the public API answers. Screenshots of every tab go to
``test-artifacts/playground/`` (``ORCHARD_TEST_ARTIFACTS`` moves ``test-artifacts``).

The in-process tests at the end (page on and off, its files, no path traversal) need no
browser and run everywhere.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from deployments.ingress import Ingress, build_api
from mlx_orchard.config import IngressOptions
from mlx_orchard.models.manager import Route
from tests.conftest import ROOT, default_args, module_app, sdk_client
from tests.speech import SENTENCES, speak_wav, word_error_rate

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
APP, KEY = "pg", "sk-playground-test"
LLM, WHISPER, TTS, EMBEDDINGS = "smollm2", "whisper-tiny.en", "kokoro", "all-minilm-l6-v2"
VLM, IMAGES = "tiny-vlm", "tiny-klein"  # random weights (tests/vlm_model.py, tests/images_model.py)
SENTENCE = SENTENCES[1]  # "Please send the weekly report to the finance team before noon."
TABS = ["models", "chat", "transcribe", "speak", "images", "embeddings", "cluster"]
ARTIFACTS = Path(os.environ.get("ORCHARD_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "playground"
WAIT_S = 120


# ----------------------------------------------------------------------------------------
# The app, the browser, and helpers
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(serve_instance, tiny_vlm_dir, tiny_image_dir) -> Iterator[str]:
    """The default models (serve_config.yaml's), a tiny vision model and a tiny image model,
    behind an API key, at ``/pg``."""
    args = default_args()
    small = {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}}
    config = {
        **args,
        "ingress": {**args["ingress"], "api_key": KEY},
        "pools": {**args["pools"], "vlm": small, "images": small},
        "vlm": [{"name": VLM, "source": str(tiny_vlm_dir), "kv_cache_gb": 0.1}],
        "images": [{"name": IMAGES, "source": str(tiny_image_dir), "preset": "flux2-klein", "default_size": "64x64",
                    "max_pixels": 128 * 128, "max_steps": 4}],
    }
    with module_app(serve_instance, APP, config) as url:
        yield url


@pytest.fixture(scope="module")
def sdk(app):
    client = sdk_client(app)
    client.api_key = KEY
    return client


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("playground") / "speech.wav"
    path.write_bytes(speak_wav(SENTENCE, path.parent))
    return path


@pytest.fixture(scope="module")
def browser(speech_wav):
    """One headless chromium for the module. Its microphone is espeak-ng saying SENTENCE."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver (make system-packages)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # both paths given: Selenium Manager never looks anything up
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--lang=en-US", "--force-prefers-reduced-motion", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={speech_wav}",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Not the test process's LD_PRELOAD (Debian's OpenBLAS, for in-process MLX): chromium's
    # renderers crash on start with it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), env=env), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(app, browser) -> Page:
    for old in ARTIFACTS.glob("*.png"):  # this run's screenshots only
        old.unlink()
    return Page(browser, app)


class Page:
    """The playground in the browser: navigation, waiting, and reading what it shows."""

    def __init__(self, driver, url: str):
        self.driver, self.url = driver, url
        self.shots: set[str] = set()  # tabs whose screenshot this module has saved

    def open(self, tab: str = "models", key: str | None = KEY) -> None:
        """Load the page on ``tab`` with ``key`` in localStorage (None: no key stored)."""
        self.driver.get(self.url)  # the origin first: localStorage belongs to it
        if key is None:
            self.js("localStorage.removeItem('orchard.apiKey')")
        else:
            self.js("localStorage.setItem('orchard.apiKey', arguments[0])", key)
        self.driver.get(f"{self.url}#{tab}")
        self.driver.refresh()  # a new hash alone would not reload
        self.wait(lambda: self.js("return document.body.dataset.ready") == "true", "the page to start")
        if key is not None:
            self.wait(lambda: self.js("return document.body.dataset.models") == "listed", "the model list")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """What an element holds, whitespace as is (textContent, not Selenium's rendered text)."""
        return self.find(css).get_property("textContent")

    def error(self, panel: str) -> str | None:
        box = self.find(f"#panel-{panel} .error")
        return None if box.get_property("hidden") else box.get_property("textContent")

    def wait(self, condition: Callable[[], object], what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot(f"failed-waiting-for-{what.replace(' ', '-')}")
                errors = {p: self.error(p) for p in TABS if self.error(p)}
                raise AssertionError(f"timed out waiting for {what}; status {self.text('#status')!r}, errors {errors}")
            time.sleep(0.05)

    def screenshot(self, name: str) -> Path:
        """The whole page (the window grown to its height for the shot) as ``<name>.png``."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        size = self.driver.get_window_size()
        height = self.js("return document.documentElement.scrollHeight")
        self.driver.set_window_size(size["width"], max(size["height"], height + 150))
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.set_window_size(size["width"], size["height"])
        if name in TABS:
            self.shots.add(name)
        return path

    def set_range(self, css: str, value: float) -> None:
        self.js("const e = document.querySelector(arguments[0]); e.value = arguments[1];"
                "e.dispatchEvent(new Event('input', {bubbles: true}))", css, str(value))

    def selected_tab(self) -> str:
        return self.js("return document.querySelector('[role=tab][aria-selected=true]').id")

    def active(self) -> str:
        return self.js("return document.activeElement.id")


def api_get(app: str, path: str) -> dict:
    r = httpx.get(f"{app}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    r.raise_for_status()
    return r.json()


# ----------------------------------------------------------------------------------------
# In the browser
# ----------------------------------------------------------------------------------------


def test_without_the_key_the_page_says_so_and_with_it_lists_every_model(page, app):
    from selenium.webdriver.common.keys import Keys

    page.open("models", key=None)
    page.wait(lambda: page.js("return document.body.dataset.models") == "failed", "the refused model list")
    error = page.error("models")
    assert error and "API key" in error and "Authorization: Bearer" in error, error
    assert "Could not list the models" in page.text("#status")
    picker = page.find("#chat-model")  # nothing to pick without the list
    assert picker.get_property("disabled") and "not listed" in picker.get_property("textContent")

    key = page.find("#api-key")
    key.send_keys(KEY, Keys.ENTER)  # the key form submits on Enter
    page.wait(lambda: page.js("return document.body.dataset.models") == "listed", "the model list")
    assert page.error("models") is None
    assert page.js("return localStorage.getItem('orchard.apiKey')") == KEY

    rows = page.js("return [...document.querySelectorAll('#models-table tbody tr')]"
                   ".map(r => [...r.children].map(c => c.textContent))")
    listed = api_get(app, "/v1/models")["data"]
    assert [(r[0], r[1]) for r in rows] == [(m["id"], m["family"]) for m in listed]
    families = {r[0]: r[1] for r in rows}
    assert {LLM: "llm", EMBEDDINGS: "embeddings", TTS: "tts", WHISPER: "transcription"}.items() <= families.items()
    for row, card in zip(rows, listed):
        assert row[2].startswith(card["status"] or "configured")
        assert row[3] == (", ".join(r["replica"] for r in card["loaded_on"]) or "—")
    # Pickers offer each panel only the models of its families.
    options = page.js("return Object.fromEntries([...document.querySelectorAll('select[data-families]')]"
                      ".map(s => [s.id, [...s.options].map(o => o.value)]))")
    of = {"chat-model": ("llm", "vlm"), "transcribe-model": ("transcription",), "speak-model": ("tts",),
          "images-model": ("images",), "embeddings-model": ("embeddings",)}
    assert options == {select: [m["id"] for m in listed if m["family"] in families] or [""] for select, families in of.items()}
    assert options["chat-model"][:2] == [LLM, "HuggingFaceTB/SmolLM2-135M-Instruct"] and VLM in options["chat-model"]
    assert options["images-model"] == [IMAGES]
    page.screenshot("models")


def test_tabs_take_arrow_keys_and_every_control_has_a_label(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.open("models")
    # Tab from the top of the page reaches the selected tab (the others are out of the tab order).
    for _ in range(10):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        if page.active() == "tab-models":
            break
    assert page.active() == "tab-models"
    outline = page.js("const s = getComputedStyle(document.activeElement); return [s.outlineStyle, s.outlineWidth]")
    assert outline[0] != "none" and outline[1] != "0px", outline  # focus is visible

    def press(key) -> tuple[str, str, list[str]]:
        ActionChains(page.driver).send_keys(key).perform()
        shown = page.js("return [...document.querySelectorAll('[role=tabpanel]')].filter(p => !p.hidden).map(p => p.id)")
        return page.selected_tab(), page.active(), shown

    assert press(Keys.ARROW_RIGHT) == ("tab-chat", "tab-chat", ["panel-chat"])
    assert press(Keys.ARROW_RIGHT) == ("tab-transcribe", "tab-transcribe", ["panel-transcribe"])
    assert press(Keys.ARROW_LEFT) == ("tab-chat", "tab-chat", ["panel-chat"])
    assert press(Keys.END) == ("tab-cluster", "tab-cluster", ["panel-cluster"])
    assert press(Keys.ARROW_RIGHT) == ("tab-models", "tab-models", ["panel-models"])  # wraps around
    assert press(Keys.ARROW_LEFT) == ("tab-cluster", "tab-cluster", ["panel-cluster"])
    assert press(Keys.HOME) == ("tab-models", "tab-models", ["panel-models"])
    # Roving tabindex: only the selected tab is in the tab order; Tab moves into its panel.
    assert page.js("return [...document.querySelectorAll('[role=tab]')].map(t => t.tabIndex)") == [0, -1, -1, -1, -1, -1, -1]
    ActionChains(page.driver).send_keys(Keys.TAB).perform()
    assert page.active() == "panel-models"

    structure = page.js("""return [...document.querySelectorAll('[role=tab]')].map(t => {
        const p = document.getElementById(t.getAttribute('aria-controls'));
        return [t.textContent, p.getAttribute('role'), p.getAttribute('aria-labelledby') === t.id];
    })""")
    assert [s[0].lower() for s in structure] == TABS
    assert all(role == "tabpanel" and back for _, role, back in structure)
    assert page.js("return document.querySelector('[role=tablist]').getAttribute('aria-label')")

    unlabelled = page.js("""return [...document.querySelectorAll('input, select, textarea, meter')]
        .filter(e => e.type !== 'hidden')
        .filter(e => !([...e.labels].some(l => l.textContent.trim()) || (e.getAttribute('aria-label') || '').trim()))
        .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    live = page.js("return ['status', 'chat-log', 'transcript'].map(id => document.getElementById(id).getAttribute('aria-live'))")
    assert live == ["polite", "polite", "polite"]


def test_a_chat_sent_with_enter_streams_the_answer_the_api_gives(page, sdk):
    from selenium.webdriver.common.keys import Keys

    page.open("chat")
    assert page.find("#chat-model").get_property("value") == LLM
    system = "You are a helpful assistant. Answer in one short paragraph."
    page.find("#chat-system").send_keys(system)
    page.find("#chat-temperature").send_keys(Keys.HOME)  # the slider by keyboard: 0, greedy
    assert page.text("#chat-temperature-value") == "0"
    page.set_range("#chat-max-tokens", 48)
    assert page.text("#chat-max-tokens-value") == "48"

    box = page.find("#chat-input")
    box.send_keys("one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "two")  # Shift+Enter: a new line, not a send
    assert box.get_property("value") == "one\ntwo"
    assert not page.js("return document.querySelectorAll('#chat-log .message').length")
    box.clear()

    # Record every length the answer passes through: a stream shows many, a single reply one.
    page.js("""window.seen = [];
        new MutationObserver(() => {
            const a = document.querySelector('#chat-log .message.assistant .text');
            if (a) window.seen.push(a.textContent.length);
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
    question = "Why is the sky blue?"
    box.send_keys(question, Keys.ENTER)
    assert box.get_property("value") == ""
    page.wait(lambda: page.js("const a = document.querySelector('#chat-log .message.assistant');"
                              "return a && !a.hasAttribute('aria-busy') && a.dataset.finish"), "the streamed answer")
    assert page.error("chat") is None
    shown = page.text("#chat-log .message.assistant .text")
    assert page.text("#chat-log .message.user .text") == question

    reply = sdk.chat.completions.create(
        model=LLM, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        temperature=0, top_p=0.95, max_tokens=48,
    )
    assert shown == reply.choices[0].message.content
    assert page.js("return document.querySelector('#chat-log .message.assistant').dataset.finish") == reply.choices[0].finish_reason
    lengths = sorted(set(page.js("return window.seen")) - {0})
    assert len(lengths) >= 3 and lengths[-1] == len(shown), lengths  # arrived in pieces, on the page as they came
    usage = page.text("#chat-usage")
    assert f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens" in usage, usage
    assert page.text("#status") == "Answer complete."
    assert page.active() == "chat-input"  # ready for the next message
    page.screenshot("chat")


def test_an_image_attached_for_a_vision_model_reaches_it(page, sdk, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.keys import Keys

    picture = tmp_path / "squares.png"
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :32] = (200, 30, 30)
    pixels[:, 32:] = (30, 30, 200)
    Image.fromarray(pixels).save(picture)

    page.open("chat")
    assert page.find("#chat-attach-row").get_property("hidden")  # a text model takes no images
    page.find("#chat-model").send_keys(VLM)  # the picker by keyboard: typing selects
    assert page.find("#chat-model").get_property("value") == VLM
    assert not page.find("#chat-attach-row").get_property("hidden")
    page.find("#chat-temperature").send_keys(Keys.HOME)
    page.set_range("#chat-max-tokens", 16)
    page.find("#chat-images").send_keys(str(picture))
    page.wait(lambda: page.js("return document.querySelectorAll('#chat-thumbs img').length") == 1, "the thumbnail")
    page.find("#chat-input").send_keys("What is in this picture?", Keys.ENTER)
    page.wait(lambda: page.js("const a = document.querySelector('#chat-log .message.assistant');"
                              "return a && !a.hasAttribute('aria-busy') && a.dataset.finish"), "the vision answer")
    assert page.error("chat") is None
    assert page.js("return document.querySelectorAll('#chat-log .message.user img').length") == 1
    assert page.js("return document.querySelectorAll('#chat-thumbs img').length") == 0  # sent with the message

    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    reply = sdk.chat.completions.create(model=VLM, temperature=0, top_p=0.95, max_tokens=16, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert page.text("#chat-log .message.assistant .text") == reply.choices[0].message.content


def test_generated_images_land_in_the_gallery(page, sdk):
    from PIL import Image

    page.open("images")
    prompt = "a red lighthouse"
    for css, value in (("#images-prompt", prompt), ("#images-size", "64x48"), ("#images-n", "2"), ("#images-seed", "7")):
        field = page.find(css)
        field.clear()
        field.send_keys(value)
    page.find("#images-send").click()
    page.wait(lambda: page.js("return document.querySelectorAll('#gallery img').length") == 2, "the gallery")
    assert page.error("images") is None
    shown = page.js("return [...document.querySelectorAll('#gallery img')].map(i => [i.src, i.alt, i.naturalWidth, i.naturalHeight])")
    assert [(alt, w, h) for _, alt, w, h in shown] == [(prompt, 64, 48)] * 2

    expected = sdk.images.generate(model=IMAGES, prompt=prompt, size="64x48", n=2, extra_body={"seed": 7})
    for (src, *_), data in zip(shown, expected.data):
        assert src.startswith("data:image/png;base64,")
        on_page = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
        from_api = np.asarray(Image.open(io.BytesIO(base64.b64decode(data.b64_json))))
        assert np.array_equal(on_page, from_api)  # the same seeds: the same pictures
    page.screenshot("images")


def test_an_uploaded_recording_shows_the_spoken_words(page, sdk, speech_wav):
    page.open("transcribe")
    page.find("#transcribe-file").send_keys(str(speech_wav))
    page.find("#transcribe-send").click()
    text = page.wait(lambda: page.text("#transcript"), "the transcript")
    assert page.error("transcribe") is None
    assert text == sdk.audio.transcriptions.create(model=WHISPER, file=speech_wav).text.strip()
    assert "weekly report" in text.lower() and "noon" in text.lower(), text
    assert word_error_rate(SENTENCE, text) <= 0.3, text
    page.screenshot("transcribe")


def test_the_microphone_records_and_transcribes(page, speech_wav):
    page.open("transcribe")
    record = page.find("#transcribe-record")
    assert not record.get_property("disabled"), page.text("#transcribe-record-state")
    record.click()
    page.wait(lambda: record.get_attribute("aria-pressed") == "true", "the recording to start")
    time.sleep(sf.info(str(speech_wav)).duration + 0.5)  # chromium's fake microphone plays the file
    record.click()
    text = page.wait(lambda: page.text("#transcript"), "the recording's transcript")
    assert page.error("transcribe") is None
    assert record.get_attribute("aria-pressed") == "false"
    heard = text.lower()
    assert sum(word in heard for word in ("weekly", "report", "finance", "noon")) >= 3, text


def test_speech_plays_in_the_page_and_says_the_text(page, app, sdk):
    page.open("speak")
    page.wait(lambda: page.js("return document.getElementById('speak-voice').options.length"), "the voices")
    voices = page.js("return [...document.getElementById('speak-voice').options].map(o => o.value)")
    assert voices == [v["id"] for v in api_get(app, f"/v1/audio/voices?model={TTS}")["data"]]
    assert page.find("#speak-voice").get_property("value") == "af_heart"
    text = "Good night."  # Kokoro runs ~20 s a sentence on 2 CPU cores: a short one
    area = page.find("#speak-text")
    area.clear()
    area.send_keys(text)
    page.find("#speak-send").click()
    duration = page.wait(lambda: page.js("const a = document.getElementById('speak-audio');"
                                         "return !a.hidden && a.readyState >= 1 && a.duration"), "the audio")
    assert page.error("speak") is None
    assert 0.5 < duration < 4.0, duration
    # What the player holds is the API's audio: whisper hears the text in it.
    data = base64.b64decode(page.driver.execute_async_script("""const done = arguments[0];
        fetch(document.getElementById('speak-audio').src).then(r => r.blob()).then(b => {
            const reader = new FileReader();
            reader.onload = () => done(reader.result.split(',')[1]);
            reader.readAsDataURL(b);
        });"""))
    assert data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")  # mp3
    heard = sdk.audio.transcriptions.create(model=WHISPER, file=("speech.mp3", data)).text
    assert word_error_rate(text, heard) <= 0.3, heard
    assert page.find("#speak-download").get_property("hidden") is False
    page.screenshot("speak")


def test_embeddings_similarity_is_the_cosine_of_the_api_vectors(page, sdk):
    page.open("embeddings")
    a, b = page.text("#embeddings-a"), page.text("#embeddings-b")
    page.find("#embeddings-send").click()
    shown = page.wait(lambda: page.text("#similarity-value"), "the similarity")
    vectors = [np.array(d.embedding) for d in sdk.embeddings.create(model=EMBEDDINGS, input=[a, b], encoding_format="float").data]
    cosine = float(vectors[0] @ vectors[1] / np.linalg.norm(vectors[0]) / np.linalg.norm(vectors[1]))
    assert float(shown) == pytest.approx(cosine, abs=1e-4)
    assert cosine > 0.5  # paraphrases
    assert page.text("#similarity-dims").startswith("384 dimensions")
    page.screenshot("embeddings")


def test_an_api_error_is_shown_in_the_panel(page):
    page.open("speak")
    page.wait(lambda: page.js("return document.getElementById('speak-voice').options.length"), "the voices")
    page.js("const v = document.getElementById('speak-voice'); v.append(new Option('nobody', 'nobody')); v.value = 'nobody'")
    page.find("#speak-send").click()
    error = page.wait(lambda: page.error("speak"), "the error")
    assert "nobody" in error and "af_heart" in error, error  # the API's message: the voice, and the ones it has
    assert page.find("#speak-send").get_property("disabled") is False


def test_the_cluster_tab_shows_the_nodes_and_what_they_have_loaded(page, app):
    page.open("cluster")
    page.wait(lambda: page.js("return document.querySelectorAll('#cluster-nodes .node').length"), "the nodes")
    cluster = api_get(app, "/v1/cluster")
    cards = page.js("return [...document.querySelectorAll('#cluster-nodes .node')].map(n => n.textContent)")
    assert len(cards) == len(cluster["nodes"])
    for card, node in zip(cards, cluster["nodes"]):
        assert node["node_id"] in card and node["address"] in card
        assert ("(head)" in card) == node["is_head"]
    loaded = {m["id"] for m in api_get(app, "/v1/models")["data"] if any(r["node_id"] == cluster["nodes"][0]["node_id"] for r in m["loaded_on"])}
    assert LLM in loaded
    for model in loaded:
        assert model in cards[0]
    if not cluster["replicas_known"]:  # the tests' Ray runs without the dashboard
        assert "needs the Ray dashboard" in page.text("#cluster-note")
    page.wait(lambda: not page.find("#cluster-refresh").get_property("disabled"), "the refresh to finish")
    page.screenshot("cluster")


def test_a_screenshot_of_every_tab(page):
    """The tests above saved each tab with its result on it (a conversation, a transcript, a
    gallery...); a tab whose test did not run (``-k``) or failed early is saved as it opens."""
    for tab in TABS:
        if tab not in page.shots:
            page.open(tab)
            page.screenshot(tab)
    for tab in TABS:
        path = ARTIFACTS / f"{tab}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path


def test_the_browser_logged_no_script_errors(page):
    """No uncaught exception and no Content-Security-Policy refusal in the whole module's session."""
    logs = page.driver.get_log("browser")
    # A refused request (the 401 before the key, the 400 of the unknown voice) is logged by
    # chromium itself as "Failed to load resource"; anything else SEVERE is the page's fault.
    severe = [e["message"] for e in logs if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert severe == []


# ----------------------------------------------------------------------------------------
# In process: the page on and off, its files
# ----------------------------------------------------------------------------------------


def in_process(root_path: str = "", **options) -> httpx.AsyncClient:
    routes = {"m": Route(name="m", family="llm", deployment="llm")}
    api = build_api(Ingress(routes, {}, IngressOptions(**options)))
    transport = httpx.ASGITransport(app=api, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://orchard")


@pytest.mark.asyncio
async def test_the_page_and_its_files_are_served_with_cache_headers():
    async with in_process(api_key="k") as http:
        page = await http.get("/")  # open without the key: the page asks for it
        css = await http.get("/playground/playground.css")
        js = await http.get("/playground/playground.js")
        assert (await http.get("/v1/models")).status_code == 401
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert js.headers["content-type"].startswith("text/javascript") and css.headers["content-type"].startswith("text/css")
    assert "max-age" in js.headers["cache-control"]
    folder = ROOT / "deployments" / "playground"
    assert js.content == (folder / "playground.js").read_bytes()
    assert css.content == (folder / "playground.css").read_bytes()
    assert "__ORCHARD" not in page.text and 'data-root=""' in page.text
    assert '/playground/playground.js?v=' in page.text


@pytest.mark.asyncio
async def test_under_a_route_prefix_the_page_points_at_it():
    async with in_process(root_path="/pg") as http:
        page = await http.get("/pg/")
    assert page.status_code == 200
    assert 'data-root="/pg"' in page.text and 'src="/pg/playground/playground.js?v=' in page.text


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/playground/index.html", "/playground/nope.js", "/playground/..%2f..%2fpyproject.toml",
                                  "/playground/%2e%2e/routers/playground.py", "/playground/../ingress.py", "/playground/",
                                  "/playground/playground.js%00.css"])
async def test_only_the_pages_own_files_are_served(path):
    async with in_process() as http:
        r = await http.get(path)
    assert r.status_code == 404, (path, r.text[:200])
    assert set(r.json()["error"]) >= {"message", "type"}


@pytest.mark.asyncio
async def test_the_playground_off_is_a_404_in_the_error_schema():
    async with in_process(playground=False) as http:
        page = await http.get("/")
        asset = await http.get("/playground/playground.js")
        health = await http.get("/health")
    assert page.status_code == asset.status_code == 404
    assert page.json()["error"]["code"] == "not_found"
    assert health.status_code == 200


def test_the_installed_package_ships_the_files():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["deployments"]
    folder = ROOT / "deployments"
    shipped = {p.relative_to(folder).as_posix() for pattern in patterns for p in folder.glob(pattern)}
    assert shipped == {f"playground/{name}" for name in ("index.html", "playground.js", "playground.css")}


def test_the_page_is_small_and_self_contained():
    folder = ROOT / "deployments" / "playground"
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 100_000, total
    page = (folder / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
