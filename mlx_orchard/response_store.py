"""Stored responses for ``previous_response_id`` and ``GET /v1/responses/{id}``: bounded in
count and in bytes, least recently used first out. Plain Python, held by the ingress."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class StoredResponse:
    body: str  # the response object, as JSON
    conversation: list[dict[str, Any]]  # every message up to and including its output (no instructions)
    nbytes: int = 0


class ResponseStore:
    def __init__(self, max_items: int = 1000, max_bytes: int = 64 << 20):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, body: str, conversation: list[dict[str, Any]]) -> None:
        item = StoredResponse(body, conversation, len(body) + len(json.dumps(conversation)))
        if item.nbytes > self.max_bytes or self.max_items == 0:
            return  # larger than the whole store: not kept (previous_response_id then gets a 404)
        with self._lock:
            old = self._items.pop(response_id, None)
            self._bytes -= old.nbytes if old else 0
            self._items[response_id] = item
            self._bytes += item.nbytes
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is not None:
                self._items.move_to_end(response_id)
            return item

    def delete(self, response_id: str) -> bool:
        with self._lock:
            item = self._items.pop(response_id, None)
            if item is not None:
                self._bytes -= item.nbytes
            return item is not None

    def __len__(self) -> int:
        return len(self._items)
