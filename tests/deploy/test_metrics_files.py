"""The workers' metric files (prometheus_client's multiprocess mode) stay bounded as workers are replaced, and what
the dead ones counted is kept (issue 33: every dead worker's files used to stay for good, and every scrape read
them: 5.5 ms a scrape with two workers, 12.7 ms after ten replacements)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx

from tests.deploy.test_workers import ready_workers, start_two_workers
from tests.support.server import ServiceProcess
from tests.support.workers import worker_pids

COUNTED = ("convserve_http_requests_total", "convserve_http_request_duration_seconds_bucket",
           "convserve_http_request_duration_seconds_count", "convserve_http_request_duration_seconds_sum",
           "convserve_inference_requests_total", "convserve_batch_rows_count")


def totals(service: ServiceProcess) -> dict[str, float]:
    """Each counted family summed over its series, from one scrape (/metrics itself is not counted)."""
    text = httpx.get(f"{service.url}/metrics", timeout=30).text
    sums = dict.fromkeys(COUNTED, 0.0)
    for line in text.splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def metrics_dir(service: ServiceProcess) -> Path:
    worker = min(worker_pids(service))
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    return Path(next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).decode())


def replace_a_worker(service: ServiceProcess) -> int:
    before = worker_pids(service)
    victim = min(before)
    os.kill(victim, 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = worker_pids(service)
        if len(after) == 2 and victim not in after and after <= ready_workers(service):
            return victim
        time.sleep(0.1)
    raise AssertionError(f"worker {victim} was not replaced within 60 s:\n{service.output()[-3000:]}")


def test_a_dead_workers_counts_are_kept_and_its_files_folded_away(start_service, tiny_repo, mnist_pngs):
    service = start_two_workers(start_service, tiny_repo)
    directory = metrics_dir(service)
    for round_ in range(3):
        for png in mnist_pngs[:10]:  # new connections: both workers take some
            response = httpx.post(f"{service.url}/models/digits/predict", files={"file": ("d.png", png, "image/png")})
            assert response.status_code == 200, response.text
        before = totals(service)
        assert before["convserve_inference_requests_total"] >= 10 * (round_ + 1)
        victim = replace_a_worker(service)
        after = totals(service)
        assert after == before, (round_, before, after)  # nothing counted meanwhile, nothing lost
        files = sorted(p.name for p in directory.glob("*.db"))
        assert not [f for f in files if f.endswith(f"_{victim}.db")], files
        live = {int(m) for f in files if (m := f.rsplit("_", 1)[1][:-3]).isdigit()}
        assert live == worker_pids(service), (files, worker_pids(service))
        assert {"counter_archive.db", "histogram_archive.db"} <= set(files), files
        assert len(files) <= 2 + 5 * len(live), files  # counter, histogram, three gauge modes per live worker
