"""Prometheus metrics: names, labels, what counts as traffic; and the OpenAPI document."""

from __future__ import annotations

import re


def metric_value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{series} not in metrics"
    return float(match.group(1))


def test_prediction_updates_http_and_model_metrics(client, mnist_pngs):
    for _ in range(3):
        client.post("/models/digits/predict", content=mnist_pngs[0][0], headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert metric_value(text, 'convserve_http_requests_total{method="POST",route="/models/{name}/predict",'
                              'status="200"}') == 3
    assert metric_value(text, 'convserve_inference_requests_total{model="digits",outcome="success",version="2"}') == 3
    assert metric_value(text, 'convserve_preprocess_duration_seconds_count{model="digits",version="2"}') == 3
    assert metric_value(text, 'convserve_request_rows_count{model="digits",version="2"}') == 3
    assert metric_value(text, 'convserve_prediction_confidence_count{model="digits",version="2"}') == 3
    assert metric_value(text, 'convserve_batch_rows_count{model="digits",version="2"}') >= 1
    assert metric_value(text, 'convserve_inference_duration_seconds_count{model="digits",version="2"}') >= 1
    assert 'convserve_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/models/{name}/predict"}' \
        in text
    assert re.search(r'convserve_predicted_class_total\{class="\d",model="digits",version="2"\} 3.0', text)
    assert metric_value(text, 'convserve_model_versions_loaded{model="digits"}') == 2
    assert metric_value(text, 'convserve_inflight_requests{model="digits",version="2"}') == 0


def test_errors_are_counted_by_status_and_route_template(client):
    client.post("/models/nope/predict", content=b"x", headers={"content-type": "image/png"})
    client.post("/models/digits/predict", content=b"x", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert metric_value(text, 'convserve_http_requests_total{method="POST",route="/models/{name}/predict",'
                              'status="404"}') == 1
    assert metric_value(text, 'convserve_inference_requests_total{model="digits",outcome="invalid",version="2"}') == 1


def test_health_and_metrics_routes_are_not_traffic(client):
    client.get("/v2/health/live")
    client.get("/v2/health/ready")
    client.get("/metrics")
    text = client.get("/metrics").text
    assert "/v2/health" not in text
    assert 'route="/metrics"' not in text


def test_histograms_not_summaries_and_one_prefix(client):
    text = client.get("/metrics").text
    types = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    assert types and all(name.startswith("convserve_") for name, _ in types)
    assert "summary" not in {kind for _, kind in types}


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/models", "/models/{name}/predict", "/models/{name}/versions/{version}/predict", "/v2",
                 "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/infer",
                 "/v2/models/{name}/versions/{version}/infer", "/v1/models/{name}", "/v1/models/{name}:predict",
                 "/v1/models/{name}/metadata", "/metrics"):
        assert path in paths, path
    predict = paths["/models/{name}/predict"]["post"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(predict["requestBody"]["content"])
    assert "PredictResponse" in str(predict["responses"]["200"])
    assert "V2InferRequest" in str(paths["/v2/models/{name}/infer"]["post"]["requestBody"])
    assert client.get("/docs").status_code == 200


def test_label_children_are_resolved_once_and_keep_the_prefix():
    from prometheus_client import CollectorRegistry, Counter

    from service.metrics import LabelChildren

    registry = CollectorRegistry()
    counter = Counter("c_total", "c", ["model", "version", "outcome"], registry=registry)
    children = LabelChildren(counter, "digits", "2")
    children["timeout",].inc()
    children["timeout",].inc(2)
    assert children["timeout",] is counter.labels("digits", "2", "timeout")
    assert registry.get_sample_value("c_total", {"model": "digits", "version": "2", "outcome": "timeout"}) == 3
    assert len(children) == 1


def test_refusal_failure_and_feedback_series_start_at_zero(client):
    """A dashboard or an absent() alert must see 0, not "no data", before the first event."""
    text = client.get("/metrics").text
    for reason in ("queue_full", "queue_delay", "deadline"):
        assert f'convserve_rejected_requests_total{{model="digits",reason="{reason}",version="2"}} 0.0' in text
    assert 'convserve_model_load_failures_total{model="digits",version="2"} 0.0' in text
    assert 'convserve_model_load_failures_total{model="digits",version="config"} 0.0' in text
    assert 'convserve_feedback_total{model="digits",outcome="incorrect",version="2"} 0.0' in text
    assert 'convserve_prediction_log_dropped_total{reason="store_error"} 0.0' in text
