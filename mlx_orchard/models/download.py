"""Model downloads from the Hugging Face Hub, in background threads, one per repo.

Plain Python (no Ray, no MLX). ``huggingface_hub.snapshot_download`` does the work into the
standard Hub cache, where :func:`mlx_orchard.models.catalog.scan_local` finds the result.
A download that fails leaves nothing that looks ready: the snapshot files it added are
removed, while completed blobs stay so that a retry does not fetch them again.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlx_orchard.models.catalog import check_repo_id, check_revision, is_complete_model

logger = logging.getLogger("orchard.download")

# What an MLX model needs. Never *.py (remote code is not run here), nor the *.bin / *.pth /
# *.onnx / *.gguf copies many repos carry next to their safetensors.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.npz"]

Status = Literal["downloading", "done", "failed"]


@dataclass(eq=False)
class DownloadState:
    repo_id: str
    revision: str  # as asked for: a branch, tag or commit
    status: Status = "downloading"
    bytes_done: int = 0
    bytes_total: int | None = None  # None until the Hub has said how big the files are
    error: str | None = None
    path: Path | None = None  # the snapshot directory, once done
    commit: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cache_restored: bool = False  # failed, and the repo's cache is back as it was before
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the download has finished (done or failed)."""
        return self.finished.wait(timeout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "status": self.status,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "error": self.error,
            "path": str(self.path) if self.path else None,
            "commit": self.commit,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class NotAModelError(Exception):
    """The repo downloaded, but what it holds cannot be served."""


class Downloads:
    """Background downloads by repo id; at most one runs per repo, however many ask."""

    def __init__(self, cache_dir: Path | None = None, endpoint: str | None = None, token: str | bool | None = None):
        self.cache_dir = cache_dir
        self.endpoint = endpoint
        self.token = token
        self._lock = threading.Lock()
        self._states: dict[str, DownloadState] = {}

    def start(self, repo_id: str, revision: str | None = None) -> DownloadState:
        check_repo_id(repo_id)
        revision = check_revision(revision) if revision is not None else "main"
        with self._lock:
            state = self._states.get(repo_id)
            if state is not None and state.status == "downloading":
                return state
            # A finished download is reused only while its snapshot is still on disk (not deleted since).
            if state is not None and state.status == "done" and state.revision == revision and state.path and state.path.is_dir():
                return state
            state = self._states[repo_id] = DownloadState(repo_id, revision)
        threading.Thread(target=self._run, args=(state,), name=f"download {repo_id}", daemon=True).start()
        return state

    def get(self, repo_id: str) -> DownloadState | None:
        with self._lock:
            return self._states.get(repo_id)

    def all(self) -> list[DownloadState]:
        with self._lock:
            return list(self._states.values())

    def forget(self, repo_id: str) -> None:
        """Drop a finished or failed download's record (the model was deleted)."""
        with self._lock:
            state = self._states.get(repo_id)
            if state is not None and state.status != "downloading":
                del self._states[repo_id]

    def active_repos(self) -> set[str]:
        """Repos the catalog must not list as ready: downloading, or failed with their partial files not cleaned up.

        A failed download whose cleanup worked leaves the cache as it found it, so a model
        that was complete before (a failed update, a mistyped revision) stays listed.
        """
        with self._lock:
            return {s.repo_id for s in self._states.values() if s.status == "downloading" or (s.status == "failed" and not s.cache_restored)}

    def _storage(self, repo_id: str) -> Path:
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser().resolve() / f"models--{repo_id.replace('/', '--')}"

    def _run(self, state: DownloadState) -> None:
        storage = self._storage(state.repo_id)
        mark: _CacheMark | None = None
        try:
            mark = _CacheMark.take(storage)  # before the dry run: it already writes refs/
            cached = self._plan(state)
            path = Path(self._snapshot(state, tqdm_class=_progress_class(state, cached)))
            if not is_complete_model(path):
                raise NotAModelError("not a model: no config.json / weights")
            total = state.bytes_total if state.bytes_total is not None else _tree_size(path)
            state.path, state.commit = path, path.name
            state.bytes_total = state.bytes_done = total
            state.status = "done"
            logger.info("downloaded %s (%s, %d bytes) to %s", state.repo_id, state.revision, total, path)
        except BaseException as e:  # a daemon thread: whatever happens becomes the state, never a crash
            state.error = describe_failure(e, self.endpoint, state.revision)
            logger.warning("download of %s failed: %s", state.repo_id, state.error, exc_info=not isinstance(e, OSError | NotAModelError))
            try:
                if mark is not None:
                    mark.restore(storage)
                    state.cache_restored = True
            except OSError as cleanup_error:
                logger.warning("could not clean up after the failed download of %s: %s", state.repo_id, cleanup_error)
            state.status = "failed"
        finally:
            state.finished_at = time.time()
            state.finished.set()

    def _snapshot(self, state: DownloadState, **kwargs: Any) -> Any:
        """huggingface_hub's snapshot_download of this repo: only the files a model needs."""
        from huggingface_hub import snapshot_download

        return snapshot_download(
            state.repo_id,
            revision=state.revision,
            cache_dir=self.cache_dir,
            endpoint=self.endpoint,
            token=self.token,
            allow_patterns=ALLOW_PATTERNS,
            **kwargs,
        )

    def _plan(self, state: DownloadState) -> int:
        """Set the total from a dry run (one HEAD per file); return the bytes already cached."""
        try:
            files = self._snapshot(state, tqdm_class=_Progress, dry_run=True)
        except Exception as e:
            # The download proper fails the same way, with the error worth reporting.
            logger.info("no size for %s: %s", state.repo_id, e)
            return 0
        cached = sum(f.file_size or 0 for f in files if f.is_cached)
        state.bytes_total = sum(f.file_size or 0 for f in files)
        state.bytes_done = cached
        return cached


class _Progress:
    """Stands in for tqdm: counts, prints nothing.

    huggingface_hub 2.4 gives ``snapshot_download``'s ``tqdm_class`` to three bars: files
    fetched (unit "it"), bytes received and bytes written (both unit "B"). Plain HTTP
    feeds both byte bars the same bytes; Xet receives fewer than it writes.
    """

    def __init__(self, *args: Any, total: float | None = None, initial: float = 0, unit: str = "it", **kwargs: Any):
        self.total = total
        self.n = initial or 0
        self.unit = unit
        self.format_dict: dict[str, Any] = {}
        self._count_lock = threading.Lock()  # one bar is updated from every file's thread

    def update(self, n: float | None = 1) -> None:
        with self._count_lock:
            self.n += n or 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # close, refresh, set_description, set_postfix_str...: nothing to display.
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _progress_class(state: DownloadState, cached: int) -> type[_Progress]:
    byte_bars: list[_Progress] = []

    class Progress(_Progress):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if self.unit == "B":
                byte_bars.append(self)

        def update(self, n: float | None = 1) -> None:
            super().update(n)
            if self.unit == "B":
                # The larger byte bar is what reached the disk (see _Progress).
                state.bytes_done = cached + int(max(bar.n for bar in byte_bars))

    return Progress


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _snapshot_files(snapshot: Path) -> set[str]:
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()}


def _read_refs(storage: Path) -> dict[str, str]:
    refs = storage / "refs"
    return {p.relative_to(refs).as_posix(): p.read_text() for p in refs.rglob("*") if p.is_file()} if refs.is_dir() else {}


@dataclass
class _CacheMark:
    """A repo's snapshots and refs before a download, to put back if the download fails."""

    existed: bool
    snapshots: dict[str, set[str]]
    refs: dict[str, str]

    @classmethod
    def take(cls, storage: Path) -> _CacheMark:
        snapshots = storage / "snapshots"
        found = {s.name: _snapshot_files(s) for s in snapshots.iterdir() if s.is_dir()} if snapshots.is_dir() else {}
        return cls(storage.is_dir(), found, _read_refs(storage))

    def restore(self, storage: Path) -> None:
        snapshots = storage / "snapshots"
        for snapshot in list(snapshots.iterdir()) if snapshots.is_dir() else []:
            before = self.snapshots.get(snapshot.name)
            if before is None:
                shutil.rmtree(snapshot)  # symlinks into blobs/: the blobs themselves stay
                continue
            for added in _snapshot_files(snapshot) - before:
                (snapshot / added).unlink()
        refs = storage / "refs"
        for name, commit in _read_refs(storage).items():
            if name not in self.refs:
                (refs / name).unlink()
            elif commit != self.refs[name]:
                (refs / name).write_text(self.refs[name])
        blobs = storage / "blobs"
        if not self.existed and not (blobs.is_dir() and any(blobs.iterdir())):
            shutil.rmtree(storage, ignore_errors=True)
        elif storage.is_dir():
            snapshots.mkdir(exist_ok=True)  # the Hub's cache scanner calls a repo without one corrupt


_UNREACHABLE = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ProxyError", "ConnectionError", "Timeout"}


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending = [error]
    while pending:
        e = pending.pop(0)
        if e not in seen:
            seen.append(e)
            pending.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return seen


def describe_failure(error: BaseException, endpoint: str | None = None, revision: str | None = None) -> str:
    """A short reason for a failed download, from the most telling error in the chain."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    chain = _chain(error)

    def find(*types: type[BaseException]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    if e := find(NotAModelError):
        return str(e)
    if find(hf.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE): the Hugging Face Hub is not contacted"
    if find(hf.GatedRepoError):
        return "gated repository: accept its terms on huggingface.co and give a token with access"
    if find(hf.RepositoryNotFoundError):
        return "repository not found (or private, and no token with access was given)"
    if find(hf.RevisionNotFoundError):
        return f"revision {revision!r} not found in this repository" if revision else "revision not found in this repository"
    if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in chain):
        return "no space left on device"
    if e := next((x for x in chain if {c.__name__ for c in type(x).__mro__} & _UNREACHABLE), None):
        where = endpoint or constants.ENDPOINT
        return f"the Hugging Face Hub ({where}) could not be reached ({type(e).__name__}: {_first_line(e)})"
    if e := find(hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return f"the Hugging Face Hub answered HTTP {status}: {_first_line(e)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""
