"""Readiness on a real server process: a service with no model at all is live but not ready."""

from __future__ import annotations

import httpx


def test_a_server_with_no_model_is_live_but_not_ready(server_factory, tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    server = server_factory(empty, wait_for="/v2/health/live")
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).json() == {"live": True}
    r = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
    assert (r.status_code, r.json()) == (503, {"ready": False})
    assert httpx.get(f"{server.url}/models", timeout=10).json() == {"models": []}
