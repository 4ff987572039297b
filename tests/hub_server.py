"""A local stand-in for the Hugging Face Hub's HTTP API: enough for ``snapshot_download``.

Serves local directories as model repos. What huggingface_hub 2.4 calls for
``snapshot_download(repo_id, revision=..., endpoint=...)``:

- ``GET /api/models/{repo}/revision/{rev}``: repo info; it reads ``sha`` (the commit).
- ``GET /api/models/{repo}/tree/{commit}?recursive=true``: every file with its ``size``
  (a Link header would page it; one page here).
- ``HEAD /{repo}/resolve/{commit}/{path}``: ``ETag`` (the blob's name in the cache),
  ``X-Repo-Commit`` and ``Content-Length``; no Xet headers, so files come over plain HTTP.
- ``GET /{repo}/resolve/{commit}/{path}``: the bytes, ``Range: bytes=N-`` honoured.

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)
as the Hub's do: huggingface_hub picks its exception type from that header.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


class _Repo:
    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, tuple[Path, int, str]] = {}  # repo path -> (file, size, sha256)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                self.files[p.relative_to(root).as_posix()] = (p, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        self.sha = hashlib.sha1("".join(f"{k}:{v[2]}\n" for k, v in self.files.items()).encode()).hexdigest()

    def folders(self) -> set[str]:
        return {"/".join(k.split("/")[:i]) for k in self.files for i in range(1, k.count("/") + 1)}


class HubServer:
    """The server itself; ``gate.clear()`` holds every file body halfway until ``gate.set()``."""

    def __init__(self, repos: dict[str, Path], *, gated: frozenset[str] | set[str] = frozenset()):
        self.repos = {repo_id: _Repo(Path(path)) for repo_id, path in repos.items()}
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.gate = threading.Event()
        self.gate.set()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@contextmanager
def hub_server(repos: dict[str, Path], *, gated: frozenset[str] | set[str] = frozenset()) -> Iterator[str]:
    """Serve ``{repo_id: directory}`` as Hub model repos; yields the endpoint URL."""
    with HubServer(repos, gated=gated) as server:
        yield server.endpoint


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects of the Hub

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._route(body=True)

        def do_HEAD(self) -> None:
            self._route(body=False)

        def _route(self, body: bool) -> None:
            url = urlsplit(self.path)
            hub.requests.append((self.command, unquote(url.path)))
            parts = url.path.strip("/").split("/")  # split before unquoting: a revision may hold a quoted "/"
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                if not rest or rest[0] == "revision":
                    return self._info(repo_id, unquote(rest[1]) if len(rest) > 1 else "main", body)
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo_id, unquote(rest[1]), parse_qs(url.query), body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])), body)
            self._error(404, "NotFound", "no such endpoint", body)

        def _repo(self, repo_id: str, revision: str, body: bool) -> _Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", body)
            elif revision not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
            else:
                return repo
            return None

        def _info(self, repo_id: str, revision: str, body: bool) -> None:
            if repo := self._repo(repo_id, revision, body):
                siblings = [{"rfilename": name} for name in repo.files]
                self._json({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "siblings": siblings}, body)

        def _tree(self, repo_id: str, revision: str, query: dict[str, list[str]], body: bool) -> None:
            if repo := self._repo(repo_id, revision, body):
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                entries: list[dict] = [
                    {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f} for f in sorted(repo.folders())
                ]
                entries += [{"type": "file", "oid": sha[:40], "size": size, "path": name} for name, (_, size, sha) in repo.files.items()]
                if not recursive:
                    entries = [e for e in entries if "/" not in e["path"]]
                self._json(entries, body)

        def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
            if repo_id in hub.gated and repo_id in hub.repos:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.", body)
            repo = self._repo(repo_id, revision, body)
            if repo is None:
                return
            if filename not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": repo.sha})
            path, size, sha = repo.files[filename]
            start = 0
            ranged = self.headers.get("Range", "")
            if body and ranged.startswith("bytes=") and ranged.endswith("-"):
                start = min(int(ranged[len("bytes=") : -1]), size)
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            self.send_header("X-Repo-Commit", repo.sha)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if body:
                self._send_file(path, start, size)

        def _send_file(self, path: Path, start: int, size: int) -> None:
            with path.open("rb") as f:
                f.seek(start)
                self.wfile.write(f.read((size - start) // 2))
                if not hub.gate.is_set():
                    self.wfile.flush()
                    hub.gate.wait(60)
                shutil.copyfileobj(f, self.wfile, 1 << 20)

        def _json(self, data: object, body: bool) -> None:
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str, body: bool, headers: dict[str, str] | None = None) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler
