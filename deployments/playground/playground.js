// Orchard playground: plain JavaScript over the public OpenAI-compatible API (and /v1/cluster).
// No build step and no dependencies. Every request goes through api(), which adds the API
// key (kept in localStorage) and turns an error answer ({"error": {"message"}}) into an Error.
"use strict";

const ROOT = document.documentElement.dataset.root || "";
const KEY_STORAGE = "orchard.apiKey";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

// ---------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    /* not JSON: keep the status line */
  }
  return new ApiError(message, response.status);
}

/** fetch() of an API path with the key; JSON in (json) or a FormData (form); the Response back. */
async function api(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
    method = method === "GET" ? "POST" : method;
  } else if (form !== undefined) {
    body = form;
    method = "POST";
  }
  let response;
  try {
    response = await fetch(ROOT + path, { method, headers, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Could not reach the server (${e.message}).`, 0);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

const apiJSON = async (path, options) => (await api(path, options)).json();

/** The events of a server-sent event stream, as parsed JSON (comments skipped, [DONE] ends it). */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue; // a keep-alive comment or an event without data
      if (data === "[DONE]") return;
      const parsed = JSON.parse(data);
      if (parsed && parsed.error) throw new ApiError(parsed.error.message || "The stream failed.", 200);
      yield parsed;
    }
    if (done) return;
  }
}

// ---------------------------------------------------------------------------------------
// Page helpers
// ---------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child);
  }
  return node;
}

function say(message) {
  $("#status").textContent = message;
}

function panelError(panel, error) {
  const box = $(".error", panel);
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  let message = error.message || String(error);
  if (error.status === 401) message += " Enter the server's API key above.";
  box.textContent = message;
  box.hidden = false;
}

/** Run an action of a panel: its button busy, its error box cleared, then filled on failure. */
async function attempt(panel, button, work) {
  panelError(panel, null);
  if (button) {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
  }
  try {
    return await work();
  } catch (e) {
    if (e.name !== "AbortError") panelError(panel, e);
    return undefined;
  } finally {
    if (button) {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }
}

function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
}

function bindSlider(input) {
  const output = document.getElementById(`${input.id}-value`);
  const show = () => (output.textContent = input.value);
  input.addEventListener("input", show);
  show();
}

// ---------------------------------------------------------------------------------------
// Tabs (WAI-ARIA tabs with automatic activation: arrows, Home and End move and select)
// ---------------------------------------------------------------------------------------

const onShow = {};

function selectTab(tab, { focus = false } = {}) {
  for (const other of $$('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  const name = tab.id.replace(/^tab-/, "");
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (onShow[name]) onShow[name]();
}

function setUpTabs() {
  const tabs = $$('[role="tab"]');
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = {
        ArrowRight: tabs[(i + 1) % tabs.length],
        ArrowLeft: tabs[(i - 1 + tabs.length) % tabs.length],
        Home: tabs[0],
        End: tabs[tabs.length - 1],
      }[event.key];
      if (next) {
        event.preventDefault();
        selectTab(next, { focus: true });
      }
    });
  }
  const fromHash = document.getElementById(`tab-${location.hash.slice(1)}`);
  selectTab(fromHash && fromHash.getAttribute("role") === "tab" ? fromHash : tabs[0]);
}

// ---------------------------------------------------------------------------------------
// Models (also feeds every panel's model picker)
// ---------------------------------------------------------------------------------------

let models = [];

/** Every panel's model picker: the listed models of its families, or ``unlisted`` (disabled). */
function fillPickers(unlisted = null) {
  for (const select of $$("select[data-families]")) {
    const families = select.dataset.families.split(" ");
    const previous = select.value;
    const fitting = unlisted ? [] : models.filter((m) => families.includes(m.family));
    select.replaceChildren(...fitting.map((m) => el("option", { value: m.id, text: `${m.id} (${m.family})` })));
    if (!fitting.length) {
      const text = unlisted || `No ${families.join(" or ")} model on this server`;
      select.append(el("option", { value: "", text }));
    }
    select.disabled = !fitting.length;
    if (fitting.some((m) => m.id === previous)) select.value = previous;
    select.dispatchEvent(new Event("change"));
  }
}

function modelRow(m) {
  const where = (m.loaded_on || []).map((r) => r.replica).join(", ");
  let status = m.status || "configured";
  if (m.status === "downloading" && m.download && m.download.total_bytes) {
    status += ` ${Math.round((100 * m.download.downloaded_bytes) / m.download.total_bytes)}%`;
  }
  if (m.status === "failed" && m.reason) status += `: ${m.reason}`;
  return el(
    "tr",
    {},
    el("th", { scope: "row", text: m.id }),
    el("td", { text: m.family || "unknown" }),
    el("td", {}, el("span", { class: `badge ${m.status || ""}`, text: status })),
    el("td", { text: where || "—" }),
    el("td", { text: formatBytes(m.size_bytes) || "—" }),
  );
}

async function loadModels() {
  const panel = $("#panel-models");
  const button = $("#models-refresh");
  const listed = await attempt(panel, button, async () => {
    const body = await apiJSON("/v1/models");
    models = body.data;
    $("#models-table tbody").replaceChildren(...models.map(modelRow));
    fillPickers();
    say(`${models.length} model${models.length === 1 ? "" : "s"} on this server.`);
    return true;
  });
  if (!listed) {
    fillPickers("Models not listed (see the Models tab)");
    say(`Could not list the models: ${$(".error", panel).textContent}`);
  }
  document.body.dataset.models = listed ? "listed" : "failed";
}

// ---------------------------------------------------------------------------------------
// Chat
// ---------------------------------------------------------------------------------------

const chat = { history: [], images: [], controller: null };

function chatFamily() {
  const model = models.find((m) => m.id === $("#chat-model").value);
  return model ? model.family : null;
}

function chatBubble(role, text, images = []) {
  const bubble = el(
    "div",
    { class: `message ${role}` },
    el("span", { class: "who", text: role === "user" ? "You" : "Assistant" }),
    images.length ? el("div", { class: "thumbs" }, images.map((url) => el("img", { src: url, alt: "attached image" }))) : null,
    el("div", { class: "text", text }),
  );
  const log = $("#chat-log");
  $(".placeholder", log)?.remove();
  log.append(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function renderThumbs() {
  const list = $("#chat-thumbs");
  list.replaceChildren(
    ...chat.images.map((url, i) => {
      const remove = el("button", { type: "button", class: "secondary small", text: "Remove", "aria-label": `Remove image ${i + 1}` });
      remove.addEventListener("click", () => {
        chat.images.splice(i, 1);
        renderThumbs();
      });
      return el("li", {}, el("img", { src: url, alt: `attached image ${i + 1}` }), remove);
    }),
  );
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function chatRequest() {
  const messages = [];
  const system = $("#chat-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.history);
  const request = {
    model: $("#chat-model").value,
    messages,
    temperature: Number($("#chat-temperature").value),
    top_p: Number($("#chat-top-p").value),
    max_tokens: Number($("#chat-max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = $("#chat-seed").value.trim();
  if (seed !== "") request.seed = Number(seed);
  return request;
}

async function sendChat() {
  const input = $("#chat-input");
  const text = input.value.trim();
  const panel = $("#panel-chat");
  if (chat.controller || !$("#chat-model").value) return;
  if (!text && !chat.images.length) {
    panelError(panel, new Error("Type a message first."));
    return;
  }
  const images = chatFamily() === "vlm" ? chat.images.slice() : [];
  const content = images.length
    ? [{ type: "text", text }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))]
    : text;
  chat.history.push({ role: "user", content });
  chatBubble("user", text, images);
  input.value = "";
  chat.images = [];
  renderThumbs();

  const answer = chatBubble("assistant", "");
  const answerText = $(".text", answer);
  let reasoning = null;
  answer.setAttribute("aria-busy", "true"); // announced once, when the answer is whole
  answer.classList.add("streaming");
  const send = $("#chat-send");
  const stop = $("#chat-stop");
  chat.controller = new AbortController();
  stop.disabled = false;
  say("The model is answering…");
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  let finish = null;
  const done = await attempt(panel, send, async () => {
    const response = await api("/v1/chat/completions", { json: chatRequest(), signal: chat.controller.signal });
    for await (const chunk of sseEvents(response)) {
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        if (!reasoning) {
          reasoning = el("details", { class: "reasoning" }, el("summary", { text: "Reasoning" }), el("div", { class: "text" }));
          answer.insertBefore(reasoning, answerText);
        }
        $(".text", reasoning).textContent += delta.reasoning_content;
      }
      if (delta.content) {
        if (firstToken === null) firstToken = performance.now();
        answerText.textContent += delta.content;
        answer.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    return true;
  });
  answer.classList.remove("streaming");
  answer.removeAttribute("aria-busy");
  stop.disabled = true;
  const aborted = chat.controller.signal.aborted;
  chat.controller = null;
  if (done || aborted) {
    chat.history.push({ role: "assistant", content: answerText.textContent });
    answer.dataset.finish = aborted ? "stopped" : finish || "";
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    if (usage && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
    if (firstToken !== null) parts.push(`first token after ${((firstToken - started) / 1000).toFixed(2)} s`);
    if (aborted) parts.push("stopped");
    else if (finish === "length") parts.push("cut at max tokens");
    $("#chat-usage").textContent = parts.join(" · ");
    say(aborted ? "Stopped." : "Answer complete.");
  } else {
    chat.history.pop(); // the failed turn is not part of the conversation
    answer.remove();
    say("The chat request failed.");
  }
  input.focus();
}

function setUpChat() {
  for (const id of ["#chat-temperature", "#chat-top-p", "#chat-max-tokens"]) bindSlider($(id));
  $("#chat-model").addEventListener("change", () => {
    const vision = chatFamily() === "vlm";
    $("#chat-attach-row").hidden = !vision;
    if (!vision && chat.images.length) {
      chat.images = [];
      renderThumbs();
    }
  });
  $("#chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat();
  });
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendChat();
    }
  });
  $("#chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("#chat-clear").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.history = [];
    $("#chat-log").replaceChildren(el("p", { class: "placeholder", text: "New conversation." }));
    $("#chat-usage").textContent = "";
    panelError($("#panel-chat"), null);
  });
  $("#chat-images").addEventListener("change", async (event) => {
    for (const file of event.target.files) chat.images.push(await readAsDataURL(file));
    event.target.value = "";
    renderThumbs();
  });
}

// ---------------------------------------------------------------------------------------
// Transcribe (upload or microphone)
// ---------------------------------------------------------------------------------------

const recorder = { media: null, chunks: [] };

async function transcribe(blob, filename, button) {
  const panel = $("#panel-transcribe");
  const output = $("#transcript");
  await attempt(panel, button, async () => {
    output.textContent = "";
    say("Transcribing…");
    const form = new FormData();
    form.append("model", $("#transcribe-model").value);
    form.append("file", blob, filename);
    const body = await apiJSON(`/v1/audio/${$("#transcribe-task").value}`, { form });
    output.textContent = body.text.trim();
    say("Transcription complete.");
  });
}

function setUpTranscribe() {
  $("#transcribe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("#transcribe-file").files[0];
    if (!file) {
      panelError($("#panel-transcribe"), new Error("Choose an audio file first."));
      return;
    }
    transcribe(file, file.name, $("#transcribe-send"));
  });
  const record = $("#transcribe-record");
  const state = $("#transcribe-record-state");
  if (!(navigator.mediaDevices && window.MediaRecorder)) {
    record.disabled = true;
    state.textContent = "Recording needs a secure page (https or localhost) and a browser with MediaRecorder.";
    return;
  }
  record.addEventListener("click", async () => {
    if (recorder.media && recorder.media.state === "recording") {
      recorder.media.stop();
      return;
    }
    panelError($("#panel-transcribe"), null);
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      panelError($("#panel-transcribe"), new Error(`No microphone: ${e.message}`));
      return;
    }
    recorder.chunks = [];
    recorder.media = new MediaRecorder(stream);
    recorder.media.addEventListener("dataavailable", (event) => event.data.size && recorder.chunks.push(event.data));
    recorder.media.addEventListener("stop", () => {
      stream.getTracks().forEach((track) => track.stop());
      record.setAttribute("aria-pressed", "false");
      record.textContent = "Record";
      state.textContent = "";
      const type = recorder.media.mimeType || "audio/webm";
      const extension = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
      transcribe(new Blob(recorder.chunks, { type }), `recording.${extension}`, record);
    });
    recorder.media.start();
    record.setAttribute("aria-pressed", "true");
    record.textContent = "Stop recording";
    state.textContent = "Recording… press again to stop and transcribe.";
  });
}

// ---------------------------------------------------------------------------------------
// Speak
// ---------------------------------------------------------------------------------------

let voicesFor = null;

async function loadVoices() {
  const model = $("#speak-model").value;
  const select = $("#speak-voice");
  if (!model || model === voicesFor) return;
  voicesFor = model;
  await attempt($("#panel-speak"), null, async () => {
    const body = await apiJSON(`/v1/audio/voices?model=${encodeURIComponent(model)}`);
    const previous = select.value;
    select.replaceChildren(...body.data.map((v) => el("option", { value: v.id, text: v.name })));
    const preferred = [previous, "af_heart"].find((id) => body.data.some((v) => v.id === id));
    if (preferred) select.value = preferred;
  });
}

function setUpSpeak() {
  bindSlider($("#speak-speed"));
  $("#speak-model").addEventListener("change", () => {
    voicesFor = null;
    if (!$("#panel-speak").hidden) loadVoices();
  });
  onShow.speak = loadVoices;
  let url = null;
  $("#speak-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt($("#panel-speak"), $("#speak-send"), async () => {
      say("Synthesizing speech…");
      const response = await api("/v1/audio/speech", {
        json: {
          model: $("#speak-model").value,
          voice: $("#speak-voice").value,
          input: $("#speak-text").value,
          speed: Number($("#speak-speed").value),
          response_format: "mp3",
        },
      });
      const blob = await response.blob();
      if (url) URL.revokeObjectURL(url);
      url = URL.createObjectURL(blob);
      const audio = $("#speak-audio");
      audio.src = url;
      audio.hidden = false;
      const link = $("#speak-download");
      link.href = url;
      link.hidden = false;
      say("Speech ready.");
      audio.play().catch(() => {}); // autoplay may be refused; the player stays
    });
  });
}

// ---------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------

function setUpImages() {
  $("#images-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("#images-prompt").value.trim();
    attempt($("#panel-images"), $("#images-send"), async () => {
      say("Generating…");
      const request = {
        model: $("#images-model").value,
        prompt,
        size: $("#images-size").value.trim() || "auto",
        n: Number($("#images-n").value) || 1,
        response_format: "b64_json",
      };
      const seed = $("#images-seed").value.trim();
      if (seed !== "") request.seed = Number(seed);
      const started = performance.now();
      const body = await apiJSON("/v1/images/generations", { json: request });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const format = body.output_format || "png";
      const items = body.data.map((image, i) => {
        const src = `data:image/${format};base64,${image.b64_json}`;
        return el(
          "li",
          {},
          el(
            "figure",
            {},
            el("img", { src, alt: prompt }),
            el(
              "figcaption",
              {},
              el("span", { text: `${prompt} · ${body.size || request.size} · ${seconds} s` }),
              el("a", { href: src, download: `orchard-${Date.now()}-${i}.${format}`, text: "Download" }),
            ),
          ),
        );
      });
      $("#gallery").prepend(...items);
      items[0].scrollIntoView({ block: "nearest" });
      say(`${items.length} image${items.length === 1 ? "" : "s"} generated.`);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
}

function setUpEmbeddings() {
  $("#embeddings-form").addEventListener("submit", (event) => {
    event.preventDefault();
    attempt($("#panel-embeddings"), $("#embeddings-send"), async () => {
      const body = await apiJSON("/v1/embeddings", {
        json: { model: $("#embeddings-model").value, input: [$("#embeddings-a").value, $("#embeddings-b").value] },
      });
      const [a, b] = body.data.sort((x, y) => x.index - y.index).map((d) => d.embedding);
      const similarity = cosine(a, b);
      $("#similarity-meter").value = similarity;
      $("#similarity-value").textContent = similarity.toFixed(4);
      $("#similarity-dims").textContent = `${a.length} dimensions · ${body.usage ? body.usage.prompt_tokens : "?"} tokens`;
      $("#similarity").hidden = false;
      say(`Cosine similarity ${similarity.toFixed(4)}.`);
    });
  });
}

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

function resourceText(resources) {
  const parts = [];
  for (const [name, value] of Object.entries(resources).sort()) {
    if (name.startsWith("accelerator_type") || name.startsWith("object_store_memory")) continue;
    parts.push(name === "memory" ? `memory ${formatBytes(value)}` : `${name} ${Number.isInteger(value) ? value : value.toFixed(2)}`);
  }
  return parts.join(" · ");
}

function nodeCard(node, loaded, replicasKnown) {
  const title = `${node.address || node.node_id.slice(0, 12)}${node.is_head ? " (head)" : ""}`;
  const replicas = node.replicas.length
    ? el(
        "table",
        { class: "grid compact" },
        el("caption", { text: "Replicas" }),
        el("thead", {}, el("tr", {}, ["Application", "Deployment", "Replica", "State"].map((h) => el("th", { scope: "col", text: h })))),
        el(
          "tbody",
          {},
          node.replicas.map((r) =>
            el("tr", {}, el("td", { text: r.application }), el("td", { text: r.deployment }), el("td", { text: r.replica_id }), el("td", { text: r.state })),
          ),
        ),
      )
    : replicasKnown
      ? el("p", { class: "hint", text: "No replicas here." })
      : null;
  const labels = Object.entries(node.labels || {}).filter(([k]) => !k.startsWith("ray.io/"));
  return el(
    "article",
    { class: `node ${node.alive ? "alive" : "dead"}`, "aria-label": `Node ${title}` },
    el("h3", {}, title, " ", el("span", { class: `badge ${node.alive ? "loaded" : "failed"}`, text: node.alive ? "alive" : "dead" })),
    el("p", { class: "mono", text: node.node_id }),
    el("p", { text: resourceText(node.resources) }),
    labels.length ? el("p", { class: "hint", text: labels.map(([k, v]) => `${k}=${v}`).join(" · ") }) : null,
    el("h4", { text: "Loaded models" }),
    loaded.length ? el("ul", {}, loaded.map((m) => el("li", { text: m }))) : el("p", { class: "hint", text: "None." }),
    replicas,
  );
}

async function loadCluster() {
  await attempt($("#panel-cluster"), $("#cluster-refresh"), async () => {
    const [cluster, list] = await Promise.all([apiJSON("/v1/cluster"), apiJSON("/v1/models")]);
    // node -> deployment -> the model ids (and aliases) loaded there
    const loadedOn = {};
    for (const m of list.data) {
      for (const r of m.loaded_on || []) {
        const byDeployment = (loadedOn[r.node_id] ||= {});
        (byDeployment[r.deployment] ||= []).push(m.id);
      }
    }
    $("#cluster-note").textContent =
      `${cluster.nodes.length} node${cluster.nodes.length === 1 ? "" : "s"}.` +
      (cluster.replicas_known ? "" : " Replica placement needs the Ray dashboard (state API), which is not running.");
    $("#cluster-nodes").replaceChildren(
      ...cluster.nodes.map((n) =>
        nodeCard(
          n,
          Object.entries(loadedOn[n.node_id] || {}).sort().map(([deployment, ids]) => `${deployment}: ${ids.join(", ")}`),
          cluster.replicas_known,
        ),
      ),
    );
  });
}

// ---------------------------------------------------------------------------------------
// The API key and start-up
// ---------------------------------------------------------------------------------------

function setUpKey() {
  const field = $("#api-key");
  field.value = apiKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = field.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    say(key ? "API key saved in this browser." : "API key removed.");
    loadModels();
    const shown = $('[role="tab"][aria-selected="true"]').id.replace(/^tab-/, "");
    if (shown === "cluster") loadCluster();
    if (shown === "speak") {
      voicesFor = null;
      loadVoices();
    }
  });
}

function start() {
  fillPickers("Loading models…");
  setUpKey();
  setUpChat();
  setUpTranscribe();
  setUpSpeak();
  setUpImages();
  setUpEmbeddings();
  $("#models-refresh").addEventListener("click", loadModels);
  $("#cluster-refresh").addEventListener("click", loadCluster);
  onShow.cluster = loadCluster;
  onShow.models = loadModels;
  setUpTabs(); // shows the tab the address names (#chat), else Models, which loads the list
  if ($("#tab-models").getAttribute("aria-selected") !== "true") loadModels();
  document.body.dataset.ready = "true";
}

start();
