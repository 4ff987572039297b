"""The playground: a small page at ``/`` (plain HTML, CSS and JavaScript from
``deployments/playground/``) that tries the models through the public API only.

``GET /`` is the page, ``GET /playground/{file}`` its assets: only the files shipped in that
folder, looked up by name (no path ever reaches the file system). The page learns where it
is mounted (a Serve route prefix) from the ``<html data-root>`` attribute written here, so
its API calls work under any prefix. Turned off by ``ingress.playground: false``.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

ASSETS_DIR = Path(__file__).resolve().parents[1] / "playground"
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_ROOT_MARK, _VERSION_MARK = "__ORCHARD_ROOT__", "__ORCHARD_VERSION__"
# The page is revalidated on every load (so an upgraded server is seen at once); it names its
# assets with a hash of their contents, so a browser may keep them for a day.
_PAGE_CACHE = "no-cache"
_ASSET_CACHE = "public, max-age=86400"
# A page that runs the API with the user's key: no framing by other sites, no inline script,
# no third-party loads; fetch may reach only this origin and the media the page made (blob:).
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: data:; "
        "connect-src 'self' blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _load_assets() -> tuple[str, dict[str, tuple[bytes, str]]]:
    """The page template and the assets it may load, read once (they ship with the package)."""
    assets = {
        path.name: (path.read_bytes(), _MEDIA_TYPES[path.suffix])
        for path in sorted(ASSETS_DIR.iterdir())
        if path.is_file() and path.suffix in _MEDIA_TYPES
    }
    version = hashlib.sha256(b"".join(data for data, _ in assets.values())).hexdigest()[:12]
    page = (ASSETS_DIR / "index.html").read_text(encoding="utf-8").replace(_VERSION_MARK, version)
    return page, assets


def router() -> APIRouter:
    api = APIRouter(include_in_schema=False)  # not part of the OpenAI API (nor its fuzzing)
    page, assets = _load_assets()

    @api.get("/", response_class=HTMLResponse)
    async def playground(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        body = page.replace(_ROOT_MARK, html.escape(root, quote=True))
        return HTMLResponse(body, headers={"Cache-Control": _PAGE_CACHE, **_SECURITY_HEADERS})

    @api.get("/playground/{name}")
    async def asset(name: str) -> Response:
        found = assets.get(name)  # a name from the folder's listing, never a path
        if found is None:
            raise HTTPException(404, f"No playground file `{name[:64]}`.")
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": _ASSET_CACHE, **_SECURITY_HEADERS})

    return api
