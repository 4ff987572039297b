"""Writes docs/grafana-orchard.json, the Grafana dashboard of Orchard's metrics.

    python docs/make_grafana.py

Import the JSON in Grafana (Dashboards > New > Import) with the Prometheus data source that
scrapes Ray's metrics (Ray's own dashboards use the same). Panels group Orchard's series by
what users ask of them: the ingress, the LLM/VLM engines, every family's replicas, and the
models each replica holds. ``tests/test_metrics.py`` checks the JSON is this script's output
and names only metrics Orchard records.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana-orchard.json"
WINDOW = "$__rate_interval"


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate(ray_orchard_{metric}[{WINDOW}]))"


def quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate(ray_orchard_{metric}_bucket[{WINDOW}])))"


def mean(metric: str, by: str) -> str:
    return f"{rate(metric + '_sum', by)} / {rate(metric + '_count', by)}"


def gauge(metric: str, by: str) -> str:
    return f"sum by ({by}) (ray_orchard_{metric})"


# (title, unit, [(expression, legend)]), rows of panels
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Ingress", [
        ("Requests by route and status", "reqps", [(rate("ingress_requests_total", "route, status"), "{{route}} {{status}}")]),
        ("Requests by model", "reqps", [(rate("ingress_requests_total", "model"), "{{model}}")]),
        ("Shed (429/503) and cancelled", "reqps", [
            (rate("ingress_shed_requests_total", "route, status"), "shed {{route}} {{status}}"),
            (rate("ingress_cancelled_requests_total", "route"), "cancelled {{route}}"),
        ]),
        ("Request body bytes", "Bps", [(rate("ingress_request_bytes_total", "route"), "{{route}}")]),
    ]),
    ("LLM and VLM", [
        ("Requests admitted to the batch", "reqps", [(rate("llm_requests_total", "family, model"), "{{family}} {{model}}")]),
        ("Time to first token", "s", [
            (quantile(0.5, "llm_time_to_first_token_s", "model"), "p50 {{model}}"),
            (quantile(0.95, "llm_time_to_first_token_s", "model"), "p95 {{model}}"),
        ]),
        ("Inter-token latency", "s", [
            (quantile(0.5, "llm_inter_token_latency_s", "model"), "p50 {{model}}"),
            (quantile(0.95, "llm_inter_token_latency_s", "model"), "p95 {{model}}"),
        ]),
        ("End-to-end latency", "s", [
            (quantile(0.5, "llm_request_latency_s", "model"), "p50 {{model}}"),
            (quantile(0.95, "llm_request_latency_s", "model"), "p95 {{model}}"),
        ]),
        ("Tokens", "short", [
            (rate("llm_prompt_tokens_total", "model"), "prompt {{model}}"),
            (rate("llm_cached_tokens_total", "model"), "cached {{model}}"),
            (rate("llm_completion_tokens_total", "model"), "completion {{model}}"),
        ]),
        ("Prefix-cache hit rate (cached / prompt tokens)", "percentunit", [
            (f"{rate('llm_cached_tokens_total', 'model')} / {rate('llm_prompt_tokens_total', 'model')}", "{{model}}"),
        ]),
        ("Running and waiting sequences", "short", [
            (gauge("llm_running_sequences", "model"), "running {{model}}"),
            (gauge("llm_waiting_sequences", "model"), "waiting {{model}}"),
        ]),
        ("Sequences per decode step", "short", [
            (mean("llm_batch_size", "model"), "mean {{model}}"),
            (quantile(0.95, "llm_batch_size", "model"), "p95 {{model}}"),
        ]),
        ("KV cache and prefix cache", "bytes", [
            (gauge("llm_kv_cache_bytes", "model"), "KV in use {{model}}"),
            (gauge("llm_prefix_cache_bytes", "model"), "prefix cache {{model}}"),
        ]),
        ("Speculative acceptance (accepted / drafted)", "percentunit", [
            (f"{rate('llm_spec_accepted_tokens_total', 'model')} / {rate('llm_spec_draft_tokens_total', 'model')}",
             "{{model}}"),
        ]),
        ("Structured-output requests", "reqps", [(rate("llm_structured_requests_total", "model, kind"), "{{model}} {{kind}}")]),
    ]),
    ("Families (embeddings, transcription, speech, images, separation, LLM, VLM)", [
        ("Requests", "reqps", [(rate("requests_total", "family, model"), "{{family}} {{model}}")]),
        ("Latency on the replica", "s", [
            (quantile(0.5, "request_latency_s", "family"), "p50 {{family}}"),
            (quantile(0.95, "request_latency_s", "family"), "p95 {{family}}"),
        ]),
        ("In flight and queue depth", "short", [
            (gauge("requests_in_flight", "family, model"), "in flight {{family}} {{model}}"),
            (gauge("queue_depth", "family, model"), "queued {{family}} {{model}}"),
        ]),
        ("Requests per batch", "short", [(mean("batch_size", "family, model"), "{{family}} {{model}}")]),
        ("Processed (audio seconds, images, inputs, tokens, steps)", "short", [
            (rate("processed_total", "family, model, unit"), "{{family}} {{model}} {{unit}}"),
        ]),
    ]),
    ("Models", [
        ("Loaded models per replica", "short", [(gauge("loaded_models", "deployment, replica"), "{{deployment}} {{replica}}")]),
        ("Pool memory per replica", "bytes", [(gauge("pool_memory_bytes", "deployment, replica"), "{{deployment}} {{replica}}")]),
        ("Loads and evictions", "ops", [
            (rate("model_loads_total", "family, model"), "load {{family}} {{model}}"),
            (rate("model_evictions_total", "family, model, reason"), "evict {{model}} ({{reason}})"),
        ]),
        ("Load time", "s", [(quantile(0.95, "model_load_seconds", "family"), "p95 {{family}}")]),
        ("Download progress", "percentunit", [
            ("max by (repo_id) (ray_orchard_download_bytes) / max by (repo_id) (ray_orchard_download_total_bytes)",
             "{{repo_id}}"),
        ]),
        ("Downloads finished", "short", [("sum by (status) (ray_orchard_downloads_total)", "{{status}}")]),
    ]),
]


def dashboard() -> dict:
    panels: list[dict] = []
    y = 0
    next_id = 1
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append({
                "type": "timeseries",
                "title": title,
                "id": next_id,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend}
                            for k, (expr, legend) in enumerate(targets)],
            })
            next_id += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "title": "Orchard",
        "uid": "orchard-overview",
        "description": "Orchard's metrics (ray_orchard_*) from Ray's Prometheus export",
        "tags": ["orchard", "ray", "serve"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [{
            "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1,
        }]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
