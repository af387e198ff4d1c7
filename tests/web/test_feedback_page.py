"""The web page's feedback and live quality, in headless Chromium: after a prediction the user sends its true label
("Was this right?"), and the live quality section shows the labelled prediction in its version's accuracy and in
the right cell of the confusion matrix, as ``GET /v2/models/{name}/quality`` answers them.

Each test runs on a server of its own (``fresh_server``), so the state store holds only what the test did."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.middleware import REQUEST_ID_RE
from tests.web.test_web_page import CIFAR_DIR, SEVEN

pytestmark = pytest.mark.timeout(180)
WAIT_SECONDS = 20


def model_of(server, name: str) -> dict:
    return next(m for m in httpx.get(f"{server.url}/models", timeout=10).json()["models"] if m["name"] == name)


def quality_of(server, name: str, version: str) -> dict:
    answer = httpx.get(f"{server.url}/v2/models/{name}/quality", timeout=10).json()
    return next(v for v in answer["versions"] if v["version"] == version)


def shown_version(page) -> str:
    """The version of the prediction shown ("mnist v1" -> "1")."""
    return page.find("#version").text.rsplit(" v", 1)[1]


def predicted_class(page) -> int:
    """The class id of the answer's top prediction, as the page marked its bar."""
    return int(page.find("#results li.top").get_attribute("data-class-id"))


def send_feedback(page, class_id: int) -> str:
    """Choose the true label, press Send, and wait for the page's answer."""
    Select(page.find("#feedback-label")).select_by_value(str(class_id))
    page.find("#feedback-send").click()

    def answered(driver) -> str:
        form = page.find("#feedback")
        text = page.find("#feedback-status").text.strip()
        return form.get_attribute("aria-busy") == "false" and text not in ("", "Sending…") and text

    return WebDriverWait(page.driver, WAIT_SECONDS).until(answered, "the feedback got no answer on the page")


def wait_for_quality_status(page, text: str) -> None:
    WebDriverWait(page.driver, WAIT_SECONDS).until(
        lambda d: page.find("#quality-card").get_attribute("aria-busy") == "false"
        and text in page.find("#quality-status").text, f"the live quality did not say {text!r}")


def wait_for_labelled(page, version: str, labelled: int):
    """The live quality of ``version`` once it shows ``labelled`` labelled predictions."""
    selector = f'#quality-versions article[data-version="{version}"]'

    def shown(driver):
        if page.find("#quality-card").get_attribute("aria-busy") != "false":
            return False
        found = page.find_all(f'{selector} dd[data-stat="labelled"]')
        return bool(found) and found[0].text == str(labelled) and page.find(selector)

    return WebDriverWait(page.driver, WAIT_SECONDS).until(
        shown, f"the live quality of version {version} did not show {labelled} labelled")


def stats(article) -> dict[str, str]:
    return {dd.get_attribute("data-stat"): dd.text for dd in article.find_elements("css selector", "dd")}


def confusion(page, version: str) -> dict:
    """The matrix drawn for ``version``: its axis labels and every cell's count, title and shade."""
    return page.driver.execute_script("""
        const table = document.querySelector(`table.confusion[data-version="${arguments[0]}"]`);
        const cells = Array.from(table.querySelectorAll('td.cell')).map((td) => ({
            true: Number(td.dataset.true), predicted: Number(td.dataset.predicted), count: Number(td.textContent),
            title: td.title, shade: getComputedStyle(td).backgroundColor}));
        return {
            columns: Array.from(table.querySelectorAll('th.column-label')).map((th) => th.textContent),
            rows: Array.from(table.querySelectorAll('th.row-label')).map((th) => th.textContent),
            cells, vertical: table.classList.contains('vertical')};""", version)


def nonzero(matrix: dict) -> dict[tuple[int, int], int]:
    return {(c["true"], c["predicted"]): c["count"] for c in matrix["cells"] if c["count"]}


def test_a_sent_label_shows_in_the_live_accuracy_and_confusion_matrix(fresh_page, fresh_server, web_models,
                                                                      artifacts_dir: Path) -> None:
    page = fresh_page
    page.select_model(web_models.digit)
    wait_for_quality_status(page, f"No predictions of {web_models.digit} logged yet.")
    assert not page.find("#feedback").is_displayed()  # nothing to give feedback on before a prediction

    page.draw(SEVEN)
    page.wait_for_results()
    assert page.top_label() == "7"
    predicted, version = predicted_class(page), shown_version(page)
    labels = model_of(fresh_server, web_models.digit)["labels"]
    form = page.find("#feedback")
    assert form.is_displayed() and "Was this right?" in form.text and "True label:" in form.text
    assert REQUEST_ID_RE.match(form.get_attribute("data-request-id"))
    choice = Select(page.find("#feedback-label"))
    assert [o.text for o in choice.options] == labels
    assert choice.first_selected_option.get_attribute("value") == str(predicted)  # "right" is one click

    true = labels.index("1")  # a wrong label: its cell is off the diagonal, so rows and columns cannot swap
    assert send_feedback(page, true) == "Thanks, recorded."
    article = wait_for_labelled(page, version, 1)

    api = quality_of(fresh_server, web_models.digit, version)
    assert api["labelled"] == 1 and api["confusion"][true][predicted] == 1
    shown = stats(article)
    assert int(shown["predictions"]) == api["predictions"] >= 1
    low, high = api["accuracy_ci95"]
    assert shown["accuracy"] == f"0.0% (0 of 1 right; 95% interval {low * 100:.1f}%–{high * 100:.1f}%)"
    assert shown["drift"].startswith(f"PSI {api['drift']['psi']:.3f}: ")

    matrix = confusion(page, version)
    assert matrix["rows"] == labels and matrix["columns"] == labels  # axis labels from the answer's labels
    assert len(matrix["cells"]) == len(labels) ** 2
    assert nonzero(matrix) == {(true, predicted): 1}  # row: the true class, column: the predicted one
    cell = next(c for c in matrix["cells"] if (c["true"], c["predicted"]) == (true, predicted))
    assert cell["title"] == f"True {labels[true]}, predicted {labels[predicted]}: 1 prediction"
    zero_shade = next(c["shade"] for c in matrix["cells"] if not c["count"])
    assert cell["shade"] != zero_shade  # the count shows in the cell's shade, not only in its text
    assert page.console_errors() == []

    page.driver.set_window_size(1280, 2000)  # the prediction, its feedback and the live quality in one picture
    try:
        shot = page.screenshot(artifacts_dir / "web-quality.png")
    finally:
        page.driver.set_window_size(1280, 1000)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_same_label_again_is_recorded_once_and_a_different_one_shows_the_conflict(
        fresh_page, fresh_server, web_models) -> None:
    page = fresh_page
    page.select_model(web_models.digit)
    page.draw(SEVEN)
    page.wait_for_results()
    predicted, version = predicted_class(page), shown_version(page)
    request_id = page.find("#feedback").get_attribute("data-request-id")

    assert send_feedback(page, predicted) == "Thanks, recorded."
    article = wait_for_labelled(page, version, 1)
    assert stats(article)["accuracy"].startswith("100.0% (1 of 1 right; 95% interval ")
    assert nonzero(confusion(page, version)) == {(predicted, predicted): 1}
    assert send_feedback(page, predicted) == "Thanks, already recorded."

    other = (predicted + 1) % len(model_of(fresh_server, web_models.digit)["labels"])
    message = send_feedback(page, other)
    refused = httpx.post(f"{fresh_server.url}/v2/models/{web_models.digit}/feedback",
                         json={"id": request_id, "index": 0, "label": other}, timeout=10)
    assert refused.status_code == 409 and message == refused.json()["error"]
    assert "failed" in page.find("#feedback-status").get_attribute("class").split()
    assert quality_of(fresh_server, web_models.digit, version)["labelled"] == 1
    assert all("409" in line for line in page.console_errors())  # only the refused label itself


def test_live_quality_follows_the_selected_model(fresh_page, fresh_server, web_models) -> None:
    if web_models.rgb is None:
        pytest.skip(web_models.rgb_why_missing)
    page = fresh_page
    page.select_model(web_models.digit)
    page.draw(SEVEN)
    page.wait_for_results()
    digit_version = shown_version(page)
    assert send_feedback(page, predicted_class(page)) == "Thanks, recorded."
    wait_for_labelled(page, digit_version, 1)

    page.select_model(web_models.rgb)
    wait_for_quality_status(page, f"No predictions of {web_models.rgb} logged yet.")
    assert not page.find_all("#quality-versions article")

    name = sorted(json.loads((CIFAR_DIR / "labels.json").read_text()))[0]
    page.upload(CIFAR_DIR / name)
    page.wait_for_results()
    labels = model_of(fresh_server, web_models.rgb)["labels"]
    true = labels.index(json.loads((CIFAR_DIR / "labels.json").read_text())[name])
    predicted, version = predicted_class(page), shown_version(page)
    assert send_feedback(page, true) == "Thanks, recorded."
    wait_for_labelled(page, version, 1)
    matrix = confusion(page, version)
    assert matrix["rows"] == labels and matrix["columns"] == labels and matrix["vertical"]  # words stand upright
    assert nonzero(matrix) == {(true, predicted): 1}
    assert quality_of(fresh_server, web_models.rgb, version)["confusion"][true][predicted] == 1

    page.select_model(web_models.digit)
    wait_for_labelled(page, digit_version, 1)
    assert page.console_errors() == []
