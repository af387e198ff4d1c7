"""The web page's explanation, in headless Chromium: after a prediction it shows the model's input, the saliency
heatmap over it and each layer's feature maps, labelled, as the explain API answers them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.web.test_web_page import CIFAR_DIR, SEVEN

pytestmark = pytest.mark.timeout(180)
WAIT_SECONDS = 20


def wait_for_explanation(page, layers: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(driver) -> bool:
        card = page.find("#explain-card")
        return (card.get_attribute("aria-busy") == "false" and page.find("#explain-body").is_displayed()
                and len(page.find_all("#feature-maps li.feature-map")) == layers)

    WebDriverWait(page.driver, WAIT_SECONDS).until(shown, f"{layers} feature-map layers did not appear")


def red_pixels(page) -> int:
    """Pixels of the heatmap canvas where red clearly dominates: where the saliency is drawn."""
    return page.driver.execute_script("""
        const canvas = document.getElementById('saliency');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 0; i < data.length; i += 4) if (data[i] > 120 && data[i] > data[i + 2] + 60) count++;
        return count;""")


def captions(page) -> list[str]:
    return [li.find_element(page.by.CSS_SELECTOR, "figcaption").text for li in page.find_all("#feature-maps li")]


def test_drawing_a_digit_shows_its_input_heatmap_and_feature_maps(page, web_server, web_models,
                                                                  artifacts_dir: Path) -> None:
    page.select_model(web_models.digit)
    assert not page.find("#explain-body").is_displayed()
    page.draw(SEVEN)
    page.wait_for_results()
    wait_for_explanation(page, 4)
    assert page.top_label() == "7"

    shown = page.find("#model-input")
    assert page.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown) == 28
    assert shown.size["width"] >= 28 * 4  # enlarged, every input pixel a visible square
    assert shown.value_of_css_property("image-rendering") == "pixelated"
    assert "28×28 grayscale image the model was given" in shown.get_attribute("alt")

    heatmap = page.find("#saliency")
    assert heatmap.get_attribute("role") == "img"
    assert heatmap.get_attribute("aria-label").startswith("Heatmap over the input: the evidence for “7” lies ")
    assert (int(heatmap.get_attribute("width")), int(heatmap.get_attribute("height"))) == (28, 28)
    assert 0 < red_pixels(page) < 28 * 28

    digit = (Path(__file__).resolve().parents[1] / "data" / "mnist" / "0000.png").read_bytes()
    layers = [(m["layer"], m["shape"]) for m in httpx.post(
        f"{web_server.url}/models/{web_models.digit}/explain", content=digit, headers={"content-type": "image/png"},
        timeout=30).json()["feature_maps"]]
    texts = captions(page)
    assert len(texts) == len(layers)
    for text, (layer, shape) in zip(texts, layers):
        assert layer in text and "×".join(map(str, shape)) in text, (text, layer, shape)
    assert ["24×24×20", "12×12×20", "8×8×50", "4×4×50"] == [t.split()[-1] for t in texts]
    for img in page.find_all("#feature-maps img"):
        assert page.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        assert "feature maps of" in img.get_attribute("alt")
    status = page.find("#explain-status")
    assert status.get_attribute("role") == "status" and "4 layers of feature maps" in status.text
    assert page.console_errors() == []

    page.driver.set_window_size(1280, 2600)  # the whole page, explanation included, in one picture
    try:
        shot = page.screenshot(artifacts_dir / "web-explain.png")
    finally:
        page.driver.set_window_size(1280, 1000)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    page.find("#clear").click()
    assert not page.find("#explain-body").is_displayed() and not page.find_all("#feature-maps li")


def test_uploading_a_colour_image_shows_every_layer_of_its_model(page, web_server, web_models) -> None:
    if web_models.rgb is None:
        pytest.skip(web_models.rgb_why_missing)
    name = sorted(json.loads((CIFAR_DIR / "labels.json").read_text()))[0]
    with (CIFAR_DIR / name).open("rb") as f:
        response = httpx.post(f"{web_server.url}/models/{web_models.rgb}/explain", files={"file": f}, timeout=30)
    page.select_model(web_models.rgb)
    page.upload(CIFAR_DIR / name)
    page.wait_for_results()
    if response.status_code != 200:  # the tiny stand-in has no convolutions: the page says why
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(page.driver, WAIT_SECONDS).until(
            lambda d: "No explanation" in page.find("#explain-status").text, "no reason shown")
        assert response.json()["error"] in page.find("#explain-status").text
        return
    layers = response.json()["feature_maps"]
    wait_for_explanation(page, len(layers))
    assert [t.split()[-1] for t in captions(page)] == ["×".join(map(str, m["shape"])) for m in layers]
    assert page.driver.execute_script(
        "return document.getElementById('model-input').naturalWidth") == response.json()["input"]["shape"][1]
    assert red_pixels(page) > 0
