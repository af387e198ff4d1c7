"""The web page at ``GET /``: served offline with safe headers, and driven end to end in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR_DIR = REPO_ROOT / "tests" / "data" / "cifar10"

# Strokes in canvas pixels (the canvas is 280x280), written large and centred like a person would.
ONE = [[(140, 45), (140, 235)]]
SEVEN = [[(75, 55), (205, 55), (185, 100), (160, 150), (135, 235)]]
PERCENT = re.compile(r"^\d{1,3}\.\d%$")
pytestmark = pytest.mark.timeout(180)


def test_http_page_and_assets_are_served_offline_with_safe_headers(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path, access_log=False, inference_threads=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["x-content-type-options"] == "nosniff"
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        html = page.text
        assert re.search(r'<html lang="en"', html) and "<main" in html
        for control in ("model-select", "file-input"):  # labelled controls
            assert f'<label for="{control}"' in html
        assert re.search(r'<div id="drop-zone"[^>]*tabindex="0"[^>]*role="button"', html)
        assert '<button id="clear" type="button">' in html and 'id="error" class="error" role="alert"' in html

        referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
        assets = [url for url in referenced if not url.startswith("data:")]
        assert sorted(assets) == ["/static/app.css", "/static/app.js"]
        bodies = [html]
        for url, kind in (("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")):
            response = client.get(url)
            assert response.status_code == 200, url
            assert response.headers["content-type"].startswith(kind)
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "content-security-policy" in response.headers
            assert response.text.strip()
            bodies.append(response.text)
        external = re.compile(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", re.I)
        for body in bodies:
            assert not external.search(body), "the page must load nothing from elsewhere"

        missing = client.get("/static/secrets.py")
        assert missing.status_code == 404 and "error" in missing.json()
        assert client.get("/static/..%2Fapp.py").status_code == 404
        # the headers are the page's, not the API's
        assert "content-security-policy" not in client.get("/models").headers


def test_draw_digits_on_the_canvas(page, web_server, web_models) -> None:
    models = httpx.get(f"{web_server.url}/models", timeout=10).json()["models"]
    ready = [m["name"] for m in models if m["default_version"] is not None]
    assert page.model_options() == ready
    assert web_models.digit in ready

    page.select_model(web_models.digit)
    assert page.find("#canvas").is_displayed()
    assert page.find("#placeholder").is_displayed() and not page.find_all("#results li")

    page.draw(ONE)
    bars = page.wait_for_results()
    assert page.top_label() == "1", bars
    assert sum(bar["top"] for bar in bars) == 1 and bars[0]["top"]
    assert all(PERCENT.match(bar["percent"]) for bar in bars), bars
    assert re.fullmatch(r"\d+ ms", page.find("#latency").text)
    version = next(m["default_version"] for m in models if m["name"] == web_models.digit)
    assert page.find("#version").text == f"{web_models.digit} v{version}"

    page.find("#clear").click()
    assert not page.find_all("#results li") and page.find("#latency").text == "–"

    page.draw(SEVEN)
    bars = page.wait_for_results()
    assert page.top_label() == "7", bars
    assert not page.find("#error").is_displayed()
    assert page.console_errors() == []  # no CSP violation, no script error, nothing failed to load


def test_screenshot_of_a_digit_prediction(page, web_models, artifacts_dir: Path) -> None:
    page.select_model(web_models.digit)
    page.draw(SEVEN)
    page.wait_for_results()
    assert page.top_label() == "7"
    shot = page.screenshot(artifacts_dir / "web-page.png")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_upload_a_cifar_image_shows_five_bars(page, web_server, web_models) -> None:
    if web_models.rgb is None:
        pytest.skip(web_models.rgb_why_missing)
    labels = json.loads((CIFAR_DIR / "labels.json").read_text())
    name = sorted(labels)[0]
    image = CIFAR_DIR / name

    page.select_model(web_models.rgb)
    assert not page.find("#canvas").is_displayed()  # drawing is for digit models only
    page.upload(image)
    bars = page.wait_for_results()

    model = next(m for m in httpx.get(f"{web_server.url}/models", timeout=10).json()["models"]
                 if m["name"] == web_models.rgb)
    assert len(bars) == 5
    assert all(bar["label"] in model["labels"] for bar in bars), bars
    assert all(PERCENT.match(bar["percent"]) for bar in bars), bars
    assert [bar["top"] for bar in bars].count(True) == 1
    widths = [float(bar["width"].removesuffix("px")) for bar in bars]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0, widths

    with image.open("rb") as f:  # the page shows what the API answers for the same file
        api = httpx.post(f"{web_server.url}/models/{web_models.rgb}/predict", files={"file": f}, timeout=10).json()
    assert page.top_label() == api["predictions"][0]["label"]
    assert page.find("#version").text == f"{web_models.rgb} v{api['version']}"
    assert page.find("#file-name").text == name and page.find("#preview").is_displayed()


def test_upload_of_a_non_image_shows_the_api_error(page, web_models, tmp_path: Path) -> None:
    page.select_model(web_models.digit)
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    page.upload(text)
    message = page.wait_for_error()
    assert "not a decodable image" in message
    assert all("400" in line for line in page.console_errors())  # only the rejected upload itself
    assert page.find("#error").get_attribute("role") == "alert"
    assert not page.find_all("#results li")
