"""Fixtures for the web page tests: a real server on the bundled models, and headless Chromium driven by Selenium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.missing import missing, require_module
from tests.support.server import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODELS = REPO_ROOT / "models"
TEST_DATA = REPO_ROOT / "tests" / "data"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BINARY", "/usr/bin/chromedriver")
WAIT_SECONDS = 15


def _has_version(model_dir: Path) -> bool:
    """A published version: a numbered directory with its model and metadata."""
    return model_dir.is_dir() and any(
        v.name.isdigit() and (v / "model.onnx").is_file() and (v / "metadata.json").is_file()
        for v in model_dir.iterdir())


def _write_tiny_rgb_model(root: Path, name: str) -> None:
    """A 32x32 RGB classifier with the CIFAR-10 labels (/255 -> dense -> softmax), like the real exports."""
    pytest.importorskip("onnx", reason="building a tiny RGB model needs the onnx package")
    from tests.support.models import CIFAR10_LABELS, write_version

    write_version(root, name, 1, (32, 32, 3), CIFAR10_LABELS, digit=False, seed=7)


class WebModels:
    """The models directory the web server serves: the bundled mnist and one RGB model."""

    def __init__(self, root: Path, digit: str, rgb: str | None, rgb_why_missing: str = "") -> None:
        self.root = root
        self.digit = digit
        self.rgb = rgb
        self.rgb_why_missing = rgb_why_missing


@pytest.fixture(scope="session")
def web_models(tmp_path_factory: pytest.TempPathFactory) -> WebModels:
    """mnist from models/ (symlinked, never written), plus models/cifar10 if it has been published,
    otherwise a tiny RGB model built here."""
    if not _has_version(BUNDLED_MODELS / "mnist"):
        missing("the bundled models/mnist has no published version in this checkout")
    root = tmp_path_factory.mktemp("web-models")
    (root / "mnist").symlink_to(BUNDLED_MODELS / "mnist", target_is_directory=True)
    if _has_version(BUNDLED_MODELS / "cifar10"):
        (root / "cifar10").symlink_to(BUNDLED_MODELS / "cifar10", target_is_directory=True)
        return WebModels(root, "mnist", "cifar10")
    try:
        _write_tiny_rgb_model(root, "tiny-cifar")
    except pytest.skip.Exception as exc:
        return WebModels(root, "mnist", None, f"no RGB model: models/cifar10 is not published and {exc.msg}")
    return WebModels(root, "mnist", "tiny-cifar")


@pytest.fixture(scope="session")
def web_server(web_models: WebModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """``python -m service`` on a loopback port, like a user runs it."""
    running = ServiceProcess(web_models.root, tmp_path_factory.mktemp("web-server-log"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Headless Chromium through the system chromedriver; always quit at the end."""
    require_module("selenium", "the browser tests need selenium (the [dev] extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for what, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            missing(f"{what} is not installed at {path} (make system-deps installs it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-quic", "--window-size=1280,1000",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP violations included
    log = tmp_path_factory.mktemp("chromedriver-log") / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(log)), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


class WebPage:
    """The page under test, with the few gestures a user makes."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.url = url
        self.by = By
        driver.get_log("browser")  # forget the previous page's messages
        driver.get(f"{url}/")
        WebDriverWait(driver, WAIT_SECONDS).until(
            lambda d: d.find_element(By.ID, "model-select").is_enabled(), "the model list did not load")

    def find(self, selector: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, selector)

    def find_all(self, selector: str) -> list:
        return self.driver.find_elements(self.by.CSS_SELECTOR, selector)

    def model_options(self) -> list[str]:
        return [o.get_attribute("value") for o in self.find_all("#model-select option")]

    def select_model(self, name: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find("#model-select")).select_by_value(name)

    def draw(self, strokes: list[list[tuple[float, float]]], step: float = 6.0) -> None:
        """Draw strokes given in canvas pixels (0..280), moving the mouse a few pixels at a time."""
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = self.find("#canvas")
        size = canvas.size
        scale_x, scale_y = size["width"] / 280, size["height"] / 280
        actions = ActionChains(self.driver, duration=0)
        for stroke in strokes:
            x0, y0 = round(stroke[0][0] * scale_x), round(stroke[0][1] * scale_y)
            # offsets from the centre of the element (Selenium 4)
            actions.move_to_element_with_offset(canvas, x0 - size["width"] // 2, y0 - size["height"] // 2)
            actions.click_and_hold()
            x, y = x0, y0
            for (ax, ay), (bx, by) in zip(stroke, stroke[1:]):
                n = max(1, int(max(abs(bx - ax), abs(by - ay)) / step))
                for i in range(1, n + 1):
                    tx = round((ax + (bx - ax) * i / n) * scale_x)
                    ty = round((ay + (by - ay) * i / n) * scale_y)
                    if (tx, ty) != (x, y):
                        actions.move_by_offset(tx - x, ty - y)
                        x, y = tx, ty
            actions.release()
        actions.perform()

    def wait_for_results(self, count: int = 5) -> list[dict]:
        """Wait until the newest prediction is shown; its bars as dicts."""
        from selenium.webdriver.support.ui import WebDriverWait

        def settled(driver) -> bool:
            results = driver.find_element(self.by.ID, "results")
            return results.get_attribute("aria-busy") == "false" and len(
                results.find_elements(self.by.CSS_SELECTOR, "li.bar")) == count

        WebDriverWait(self.driver, WAIT_SECONDS).until(settled, f"{count} result bars did not appear")
        return self.bars()

    def bars(self) -> list[dict]:
        return [{"label": li.find_element(self.by.CSS_SELECTOR, ".label").text,
                 "percent": li.find_element(self.by.CSS_SELECTOR, ".percent").text,
                 "top": "top" in (li.get_attribute("class") or "").split(),
                 "width": li.find_element(self.by.CSS_SELECTOR, ".fill").value_of_css_property("width")}
                for li in self.find_all("#results li.bar")]

    def top_label(self) -> str:
        return self.find("#results li.top .label").text

    def upload(self, path: Path) -> None:
        self.find("#file-input").send_keys(str(path))

    def wait_for_error(self) -> str:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, WAIT_SECONDS).until(
            lambda d: d.find_element(self.by.ID, "error").text.strip(), "no error message appeared")
        return self.find("#error").text

    def console_errors(self) -> list[str]:
        """Console errors since the last call (CSP violations, script errors, failed loads)."""
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(path)), f"could not write {path}"
        return path


@pytest.fixture()
def page(chrome, web_server: ServiceProcess) -> WebPage:
    """The page freshly loaded from the real server."""
    return WebPage(chrome, web_server.url)


@pytest.fixture()
def fresh_server(web_models: WebModels, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A server of this test's own on the same models, so its state store (prediction log, feedback) starts
    empty and what the test counts is only what it did."""
    running = ServiceProcess(web_models.root, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture()
def fresh_page(chrome, fresh_server: ServiceProcess) -> WebPage:
    """The page freshly loaded from :func:`fresh_server`."""
    return WebPage(chrome, fresh_server.url)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
