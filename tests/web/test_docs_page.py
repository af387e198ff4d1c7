"""``GET /docs`` in headless Chromium: Swagger UI renders this server's OpenAPI document from files served here,
under the page's Content-Security-Policy, with nothing blocked and nothing fetched from elsewhere."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.timeout(180)


def test_docs_render_every_route_offline_under_the_csp(chrome, web_server) -> None:
    chrome.get_log("browser")  # forget the previous page's messages
    chrome.get(f"{web_server.url}/docs")
    WebDriverWait(chrome, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
    paths = {e.text for e in chrome.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/models/{name}/predict", "/v2/models/{name}/infer", "/v1/models/{name}:predict"} <= {
        p.replace("\u200b", "") for p in paths}
    resources = chrome.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(web_server.url) or url.startswith("data:") for url in resources), resources
    errors = [e["message"] for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # no CSP violation, no script error, nothing failed to load
