"""Prometheus and Grafana configuration: promtool's checks and rule unit tests, the Grafana provisioning,
and every metric the dashboard and the rules use is one the service exports."""

from __future__ import annotations

import subprocess

import yaml

REQUIRED_PANELS_METRICS = {
    "convserve_inference_requests_total",  # request rate per model
    "convserve_http_request_duration_seconds_bucket",
    "convserve_inference_duration_seconds_bucket",  # latency per model
    "convserve_batch_rows_bucket",
    "convserve_queue_duration_seconds_bucket",
    "convserve_predicted_class_total",
    "convserve_model_versions_loaded",
    "convserve_rejected_requests_total",
    "convserve_model_load_failures_total",
}


def run(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_config(promtool, repo_root):
    result = run(promtool, "check", "config", "deploy/prometheus/prometheus.yml", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules(promtool, repo_root):
    result = run(promtool, "check", "rules", "deploy/prometheus/rules.yml", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool, repo_root):
    """Alerts fire (and stay quiet) as intended on synthetic series: deploy/prometheus/rules_test.yml."""
    result = run(promtool, "test", "rules", "rules_test.yml", cwd=repo_root / "deploy" / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_the_compose_api_and_loads_the_rules(repo_root):
    config = yaml.safe_load((repo_root / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "convserve"]
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_rules_cover_errors_latency_rejections_and_load_failures(repo_root, exported_metric_names, metric_names_in):
    groups = yaml.safe_load((repo_root / "deploy" / "prometheus" / "rules.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    used = set().union(*(metric_names_in(rule["expr"]) for rule in rules))
    assert used >= {"convserve_http_requests_total", "convserve_http_request_duration_seconds_bucket",
                    "convserve_rejected_requests_total", "convserve_model_load_failures_total"}
    assert used <= exported_metric_names, used - exported_metric_names
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert alerts >= {"ConvserveHighErrorRatio", "ConvserveHighLatencyP99", "ConvserveRequestsRejected",
                      "ConvserveModelLoadFailed"}
    for rule in rules:
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]


def test_dashboard_metrics_are_exported_by_the_service(dashboard_queries, exported_metric_names, metric_names_in):
    used = set().union(*(metric_names_in(expr) for _, expr in dashboard_queries))
    assert used >= REQUIRED_PANELS_METRICS, REQUIRED_PANELS_METRICS - used
    assert used <= exported_metric_names, used - exported_metric_names
    assert all(metric_names_in(expr) for _, expr in dashboard_queries), "a query without a convserve metric"


def test_dashboard_json(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
            assert panel["targets"], panel["title"]
    quantiles = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    assert "histogram_quantile(0.5," in quantiles and "histogram_quantile(0.99," in quantiles
    (model,) = dashboard["templating"]["list"]
    assert model["name"] == "model" and model["includeAll"] and model["allValue"] == ".*"


def test_grafana_provisioning_matches_compose_and_dashboard(repo_root, dashboard):
    provisioning = repo_root / "deploy" / "grafana" / "provisioning"
    (datasources,) = [yaml.safe_load(p.read_text()) for p in (provisioning / "datasources").glob("*.yml")]
    source, traces = datasources["datasources"]
    assert (datasources["apiVersion"], source["type"], source["uid"]) == (1, "prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090"  # the compose service
    # Exemplars (tracing on) lead to their trace in the tracing profile's Jaeger.
    assert source["jsonData"]["exemplarTraceIdDestinations"] == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    assert (traces["type"], traces["uid"], traces["url"]) == ("jaeger", "jaeger", "http://jaeger:16686")
    jaeger = yaml.safe_load((repo_root / "docker-compose.yml").read_text())["services"]["jaeger"]
    assert jaeger["ports"][0].endswith(":16686")
    (providers,) = [yaml.safe_load(p.read_text()) for p in (provisioning / "dashboards").glob("*.yml")]
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((repo_root / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["volumes"]}
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (repo_root / "deploy" / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()
