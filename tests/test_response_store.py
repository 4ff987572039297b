"""The Responses API's store: bounded in count and bytes, least recently used out."""

from mlx_orchard.response_store import ResponseStore


def test_bounded_in_count_least_recently_used_out():
    store = ResponseStore(max_items=2, max_bytes=1 << 20)
    store.put("a", "{}", [])
    store.put("b", "{}", [])
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", "{}", [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None


def test_bounded_in_bytes():
    store = ResponseStore(max_items=100, max_bytes=1000)
    for i in range(10):
        store.put(str(i), "x" * 300, [])
    assert len(store) == 3
    store.put("huge", "x" * 2000, [])  # larger than the whole store: not kept, nothing evicted
    assert store.get("huge") is None and len(store) == 3


def test_delete():
    store = ResponseStore()
    store.put("a", "{}", [{"role": "user", "content": "hi"}])
    assert store.delete("a") and not store.delete("a") and store.get("a") is None
