"""A real Prometheus, run with the project's deploy/prometheus/ config and rules (pointed at a loopback
service, scraping every second), scrapes a real service process that classifies real digits; its HTTP API
then answers the queries the rules and the Grafana dashboard use."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml


class Prometheus:
    def __init__(self, binary: str, config: Path, data: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.log_path.read_text()}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready: {self.log_path.read_text()}")

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture()
def run_prometheus(prometheus_binary: str, tmp_path: Path, get_free_port) -> Iterator:
    """``run_prometheus(config_dict) -> Prometheus``, ready; always stopped at the end."""
    started: list[Prometheus] = []

    def start(config: dict, port: int) -> Prometheus:
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        prometheus = Prometheus(prometheus_binary, path, tmp_path / "tsdb", port, tmp_path / "prometheus.log")
        started.append(prometheus)
        prometheus.wait_ready()
        return prometheus

    yield start
    for prometheus in started:
        prometheus.stop()


def loopback_config(repo_root: Path, tmp_path: Path, service_port: int, prometheus_port: int) -> dict:
    """The project's prometheus.yml with its targets on loopback, 1s intervals and an absolute rules path."""
    config = yaml.safe_load((repo_root / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    rules = tmp_path / "rules.yml"
    shutil.copy(repo_root / "deploy" / "prometheus" / "rules.yml", rules)
    config["rule_files"] = [str(rules)]
    targets = {"convserve": f"127.0.0.1:{service_port}", "prometheus": f"127.0.0.1:{prometheus_port}"}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


def as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: its variables at the values the dashboard opens with."""
    expr = re.sub(r"label_values\((\w+), (\w+)\)", r"group by (\2) (\1)", expr)
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$__interval", "15s")
            .replace("$model", ".*"))


def test_real_prometheus_scrapes_the_service_and_evaluates_rules_and_dashboard_queries(
        run_prometheus, start_service, bundled_mnist_repo, mnist_pngs, dashboard_queries, repo_root, tmp_path,
        get_free_port):
    service = start_service(bundled_mnist_repo)
    prometheus_port = get_free_port()
    config = loopback_config(repo_root, tmp_path, service.port, prometheus_port)
    promtool = shutil.which("promtool")
    if promtool:  # the rewritten copy is still a valid config
        (tmp_path / "check.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run([promtool, "check", "config", str(tmp_path / "check.yml")], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    prometheus = run_prometheus(config, prometheus_port)

    stop = threading.Event()
    failures: list[object] = []
    served = [0]

    def traffic() -> None:
        try:
            with httpx.Client(base_url=service.url, timeout=10) as client:
                i = 0
                while not stop.is_set():
                    files = [("files", (f"{n}.png", mnist_pngs[(i + n) % len(mnist_pngs)], "image/png"))
                             for n in range(3)]
                    response = client.post("/models/mnist/predict", files=files)
                    if response.status_code != 200:
                        failures.append((response.status_code, response.text))
                    served[0] += 1
                    i += 3
                    time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - a lost connection ends the traffic, and fails the test below
            failures.append(repr(exc))

    driver = threading.Thread(target=traffic, daemon=True)
    driver.start()
    try:
        wanted = {
            "requests": "sum(convserve_http_requests_total)",
            "p99": "histogram_quantile(0.99, sum by (le) (rate(convserve_http_request_duration_seconds_bucket[1m])))",
            "recorded p99": "convserve:http_request_duration_seconds:p99_5m",
            # models/mnist/2 in the copy is corrupt: a load failure, seen by the rule and its alert.
            "load failures": 'convserve:model_load_failures:increase15m{model="mnist",version="2"}',
            "alert": 'ALERTS{alertname="ConvserveModelLoadFailed",alertstate="firing",model="mnist"}',
        }
        results: dict[str, list] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            results = {name: prometheus.query(q) for name, q in wanted.items()}
            p99 = results["p99"]
            if all(results.values()) and not math.isnan(float(p99[0]["value"][1])):
                break
            time.sleep(0.5)
        missing = [name for name, result in results.items() if not result]
        assert not missing, (f"no data for {missing}; traffic failures: {failures[:3]}; "
                             f"prometheus log: {prometheus.log_path.read_text()[-2000:]}")
        assert float(results["requests"][0]["value"][1]) > 0
        p99 = float(results["p99"][0]["value"][1])
        assert math.isfinite(p99) and p99 > 0  # a quantile of real latencies; how fast is bench/'s business

        targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        convserve = [t for t in targets if t["labels"]["job"] == "convserve"]
        assert [t["health"] for t in convserve] == ["up"], convserve
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) >= 10
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]

        # Every dashboard query is valid PromQL against the real series; all but the ones about failures
        # that did not happen (5xx, rejections) return data.
        empty = []
        for title, expr in dashboard_queries:
            if not prometheus.query(as_promql(expr)):
                empty.append(title)
        allowed_empty = {title for title, expr in dashboard_queries
                         if "convserve_rejected_requests_total" in expr or 'status=~"5.."' in expr}
        assert set(empty) <= allowed_empty, set(empty) - allowed_empty
        classes = prometheus.query(as_promql(next(e for t, e in dashboard_queries if "class" in t.lower())))
        assert {r["metric"]["class"] for r in classes} >= {"7", "2", "1", "0"}  # the first test digits
    finally:
        stop.set()
        driver.join(timeout=15)
    assert not driver.is_alive()
    assert not failures, failures[:3]
    assert served[0] > 0
