"""The web page's rollouts, in headless Chromium: each model's serving version, its candidate and the guards, and
the last decision, as ``GET /v2/models/{name}/rollout`` answers them, after a canary started and aborted by hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.server import ServiceProcess
from tests.web.conftest import BUNDLED_MODELS, WebPage

pytestmark = pytest.mark.timeout(180)
WAIT_SECONDS = 20
ADMIN = {"Authorization": "Bearer page-token"}


@pytest.fixture()
def two_versions(tmp_path: Path) -> Path:
    """mnist with versions 1 and 2, both the bundled version 1 (symlinked, never written)."""
    model = tmp_path / "models" / "mnist"
    model.mkdir(parents=True)
    for name in ("config.pbtxt", "labels.txt"):
        if (BUNDLED_MODELS / "mnist" / name).exists():
            (model / name).symlink_to(BUNDLED_MODELS / "mnist" / name)
    for version in ("1", "2"):
        (model / version).symlink_to(BUNDLED_MODELS / "mnist" / "1", target_is_directory=True)
    return tmp_path / "models"


@pytest.fixture()
def server(two_versions: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    running = ServiceProcess(two_versions, tmp_path, env={"CONVSERVE_ADMIN_TOKEN": "page-token"})
    try:
        yield running
    finally:
        running.stop()


def row_text(page: WebPage, model: str) -> list[str]:
    """The cells of a model's row as shown, read in one go (a refresh replaces the rows)."""
    rows = page.driver.execute_script(
        "return [...document.querySelectorAll('#rollout-rows tr')]"
        ".map((tr) => [...tr.querySelectorAll('th, td')].map((c) => c.innerText.trim()));")
    return next((cells for cells in rows if cells and cells[0] == model), [])


def test_the_page_shows_a_running_canary_and_then_its_abort(chrome, server):
    r = httpx.post(f"{server.url}/v2/repository/models/mnist/rollout", headers=ADMIN, timeout=30,
                   json={"candidate": "1", "mode": "canary", "traffic": 0.2})
    assert r.status_code == 200, r.text
    page = WebPage(chrome, server.url)
    WebDriverWait(chrome, WAIT_SECONDS).until(lambda d: len(row_text(page, "mnist")) == 5,
                                              "the rollouts table never showed mnist")
    model, serving, candidate, guards, last = row_text(page, "mnist")
    assert serving == "version 2"
    assert candidate == "version 1: canary (20% of traffic)"
    assert "agreement" in guards and "candidate answers" in guards
    assert last == "–"
    assert "1 rollout running" in page.find("#rollout-status").text

    r = httpx.post(f"{server.url}/v2/repository/models/mnist/rollout/abort", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    page.find("#rollout-refresh").click()
    WebDriverWait(chrome, WAIT_SECONDS).until(lambda d: "aborted" in (row_text(page, "mnist") or [""] * 5)[4],
                                              "the abort never showed")
    model, serving, candidate, guards, last = row_text(page, "mnist")
    assert (serving, candidate, guards) == ("version 2", "none", "–")
    assert last.startswith("version 1 aborted: aborted by hand")
    assert "0 rollouts running" in page.find("#rollout-status").text
