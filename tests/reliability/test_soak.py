"""A bounded soak: mixed valid and invalid traffic over every protocol (image uploads, KServe v2 JSON and
binary, TF Serving rows and b64, metadata, health, metrics) against one real server. Every request is answered
with the status its kind calls for (never a 5xx, never lost), and after warm-up the process's resident memory
and open file descriptors stay flat.

CONVSERVE_SOAK_SECONDS sets the duration (default 30); the numbers go to test-artifacts/soak.json.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.server import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = float(os.environ.get("CONVSERVE_SOAK_SECONDS", "30"))
WORKERS = 4
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
FD_GROWTH_LIMIT = 8


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to send it, the status it must get, and how to check a 200's content."""

    name: str
    send: Callable[[httpx.Client, random.Random], tuple[httpx.Response, object]]
    status: int
    check: Callable[[httpx.Response, object], bool] = lambda response, expected: True
    weight: int = 1


@pytest.fixture(scope="module")
def soak_server(models_root, tmp_path_factory):
    """Every setting at its default, as in production (the access log on, the repository polled every 5 s), but
    for a small body limit that makes the over-limit kind cheap to send."""
    server = ServiceProcess(models_root, tmp_path_factory.mktemp("soak-log"),
                            {"CONVSERVE_MAX_BODY_BYTES": str(2 * 1024 * 1024)}, timeout=90)
    yield server
    server.stop()


def build_kinds(digits: list[tuple[bytes, int]]) -> list[Kind]:
    pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32) for png, _ in digits]
    b64 = [base64.b64encode(png).decode() for png, _ in digits]

    def pick(rng: random.Random, n: int = 1) -> list[int]:
        return [rng.randrange(len(digits)) for _ in range(n)]

    def labels_of(chosen: list[int]) -> list[int]:
        return [digits[i][1] for i in chosen]

    def classes(response: httpx.Response) -> list[int]:
        return [p["class_id"] for p in response.json()["predictions"]]

    def multipart(http, rng):
        chosen = pick(rng, rng.randint(1, 4))
        files = [("files", (f"{i}.png", digits[i][0], "image/png")) for i in chosen]
        return http.post("/models/mnist/predict", files=files), labels_of(chosen)

    def raw_png(http, rng):
        chosen = pick(rng)
        return http.post("/models/mnist/predict", content=digits[chosen[0]][0],
                         headers={"content-type": "image/png"}), labels_of(chosen)

    def base64_json(http, rng):
        chosen = pick(rng, 2)
        return http.post("/models/mnist/predict?top_k=3", json={"images": [b64[i] for i in chosen]}), \
            labels_of(chosen)

    def v2_json(http, rng):
        chosen = pick(rng, rng.randint(1, 3))
        rows = np.stack([pixels[i] for i in chosen])[..., None]
        body = {"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.ravel().tolist()}]}
        return http.post("/v2/models/mnist/infer", json=body), labels_of(chosen)

    def v2_classification(http, rng):
        chosen = pick(rng)
        body = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                            "data": pixels[chosen[0]].ravel().tolist()}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}
        return http.post("/v2/models/mnist/infer", json=body), labels_of(chosen)

    def v2_binary(http, rng):
        chosen = pick(rng, rng.randint(1, 16))
        rows = np.stack([pixels[i] for i in chosen])[..., None]
        header = json.dumps({"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": rows.nbytes}}],
                             "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
        return http.post("/v2/models/mnist/infer", content=header + rows.tobytes(),
                         headers={"inference-header-content-length": str(len(header))}), labels_of(chosen)

    def tf_rows(http, rng):
        chosen = pick(rng, 2)
        return http.post("/v1/models/mnist:predict",
                         json={"instances": [pixels[i].tolist() for i in chosen]}), labels_of(chosen)

    def tf_b64(http, rng):
        chosen = pick(rng)
        return http.post("/v1/models/mnist/versions/1:predict",
                         json={"instances": [{"b64": b64[chosen[0]]}]}), labels_of(chosen)

    def get(path):
        return lambda http, rng: (http.get(path), None)

    def post(path, content, content_type="application/json", **headers):
        return lambda http, rng: (http.post(path, content=content,
                                            headers={"content-type": content_type, **headers}), None)

    def v2_argmax(response, expected):
        if "inference-header-content-length" in response.headers:
            length = int(response.headers["inference-header-content-length"])
            probabilities = np.frombuffer(response.content[length:], np.float32).reshape(-1, 10)
        else:
            probabilities = np.array(response.json()["outputs"][0]["data"]).reshape(-1, 10)
        return probabilities.argmax(axis=1).tolist() == expected

    def tf_argmax(response, expected):
        return np.array(response.json()["predictions"]).argmax(axis=1).tolist() == expected

    truncated = digits[0][0][:60]
    nan_header = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 3136}}]}).encode()
    nan_rows = np.full((1, 28, 28, 1), np.nan, np.float32).tobytes()
    ppm = b"P5\n28 28\n255\n" + bytes(784)
    return [
        Kind("multipart upload", multipart, 200, lambda r, e: classes(r) == e, weight=3),
        Kind("raw png upload", raw_png, 200, lambda r, e: classes(r) == e, weight=3),
        Kind("base64 json upload", base64_json, 200, lambda r, e: classes(r) == e, weight=2),
        Kind("v2 json", v2_json, 200, v2_argmax, weight=2),
        Kind("v2 classification", v2_classification, 200,
             lambda r, e: int(r.json()["outputs"][0]["data"][0].split(":")[1]) == e[0]),
        Kind("v2 binary", v2_binary, 200, v2_argmax, weight=3),
        Kind("tf serving rows", tf_rows, 200, tf_argmax, weight=2),
        Kind("tf serving b64", tf_b64, 200, tf_argmax),
        Kind("GET /models", get("/models"), 200),
        Kind("GET /v2/models/mnist", get("/v2/models/mnist"), 200),
        Kind("GET /v1/models/mnist/metadata", get("/v1/models/mnist/metadata"), 200),
        Kind("GET /v2/health/ready", get("/v2/health/ready"), 200),
        Kind("GET /metrics", get("/metrics"), 200),
        Kind("truncated png", post("/models/mnist/predict", truncated, "image/png"), 400),
        Kind("ppm image", post("/models/mnist/predict", ppm, "image/x-portable-graymap"), 400),
        Kind("malformed json", post("/v2/models/mnist/infer", b'{"inputs": ['), 400),
        Kind("deep json", post("/v1/models/mnist:predict", b"[" * 5000), 400),
        Kind("binary NaN", post("/v2/models/mnist/infer", nan_header + nan_rows, "application/octet-stream",
                                **{"inference-header-content-length": str(len(nan_header))}), 400),
        Kind("wrong shape", post("/v2/models/mnist/infer", json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()), 400),
        Kind("unknown model", post("/models/nope/predict", truncated, "image/png"), 404),
        Kind("unsupported media type", post("/models/mnist/predict", b"hello", "text/plain"), 415),
        Kind("body over the limit", post("/models/mnist/predict", b"\0" * (2 * 1024 * 1024 + 1), "image/png"), 413),
        Kind("admin api off", post("/v2/repository/index", b"{}"), 403),
    ]


def test_mixed_load_soak_answers_everything_and_stays_flat(soak_server, digits, assert_still_serving):
    server = soak_server
    kinds = build_kinds(digits)
    weighted = [kind for kind in kinds for _ in range(kind.weight)]
    with httpx.Client(base_url=server.url, timeout=60) as http:  # warm every path once
        for kind in kinds:
            response, expected = kind.send(http, random.Random(0))
            assert response.status_code == kind.status, (kind.name, response.status_code, response.text[:300])
    sent = Counter()
    answered = Counter()
    wrong: list[str] = []
    lost: list[str] = []
    crashed: list[str] = []  # an exception outside a request (checking an answer, say) that ended a client
    lock = threading.Lock()
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            client(rng)
        except BaseException as exc:  # recorded, and asserted on below
            with lock:
                crashed.append(f"client {seed}: {exc!r}")

    def client(rng: random.Random) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                kind = rng.choice(weighted)
                with lock:
                    sent[kind.name] += 1
                try:
                    response, expected = kind.send(http, rng)
                except httpx.HTTPError as exc:
                    with lock:
                        lost.append(f"{kind.name}: {exc!r}")
                    continue
                ok = response.status_code == kind.status and (kind.status != 200 or kind.check(response, expected))
                with lock:
                    answered[response.status_code] += 1
                    if not ok:
                        wrong.append(f"{kind.name}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(WORKERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    warm_up = max(3.0, SOAK_SECONDS * 0.2)
    time.sleep(warm_up)
    rss_start, fds_start, requests_at_start = server.rss_bytes(), server.open_fds(), sum(sent.values())
    rss_peak = rss_start
    while time.monotonic() - started < SOAK_SECONDS:
        time.sleep(1)
        rss_peak = max(rss_peak, server.rss_bytes())
    rss_end, fds_end_loaded = server.rss_bytes(), server.open_fds()
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 10  # the workers' keep-alive connections close with their clients
    while server.open_fds() > fds_start and time.monotonic() < deadline:
        time.sleep(0.2)
    fds_end = server.open_fds()

    total = sum(sent.values())
    report = {
        "seconds": round(elapsed, 1), "workers": WORKERS, "requests": total,
        "requests_per_second": round(total / elapsed, 1),
        "requests_after_warm_up": total - requests_at_start,
        "statuses": {str(k): v for k, v in sorted(answered.items())},
        "by_kind": dict(sorted(sent.items())),
        "rss_after_warm_up_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1), "rss_growth_mb": round((rss_end - rss_start) / 2**20, 2),
        "fds_after_warm_up": fds_start, "fds_end_under_load": fds_end_loaded, "fds_end_idle": fds_end,
        "wrong": len(wrong), "lost": len(lost),
    }
    print(json.dumps(report, indent=1))
    artifacts = REPO_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "soak.json").write_text(json.dumps(report, indent=1) + "\n")

    assert all(not thread.is_alive() for thread in threads)
    assert crashed == [], crashed
    assert lost == [], lost[:5]
    assert sum(answered.values()) == total  # every request answered
    assert not [s for s in answered if s >= 500], answered
    assert wrong == [], wrong[:5]
    assert total - requests_at_start > 100
    assert rss_end - rss_start < RSS_GROWTH_LIMIT, report
    assert fds_end - fds_start <= FD_GROWTH_LIMIT, report
    # The access log (on by default) has one line per request (and the warm-up's, and the checks' above).
    access_lines = server.output().count('"logger":"service.access"')
    assert access_lines >= total, (access_lines, total)
    assert_still_serving(server)
