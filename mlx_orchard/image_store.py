"""Generated images answered as URLs (``response_format: url``): held by the ingress for a
while, bounded in bytes, oldest out first. Plain Python."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_at: float


class ImageFileStore:
    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 256 << 20, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, extension: str) -> str:
        """The new image's id (a file name with ``extension``); it is served until ttl_s from now
        or until newer images push it out."""
        name = f"img-{secrets.token_urlsafe(18)}.{extension}"
        with self._lock:
            self._expire()
            self._items[name] = StoredImage(data, media_type, self._clock() + self.ttl_s)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped.data)
        return name

    def get(self, name: str) -> StoredImage | None:
        with self._lock:
            self._expire()
            return self._items.get(name)

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            name, item = next(iter(self._items.items()))
            if item.expires_at > now:
                break
            del self._items[name]
            self._bytes -= len(item.data)

    def __len__(self) -> int:
        return len(self._items)
