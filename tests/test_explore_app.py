"""``lava explore`` end to end: the real command serves on a free localhost port; the API is driven
through ``gradio_client`` and the page through a headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium). Results must equal ``lava.segment`` on the same inputs.

Skips when the explore extra is not installed (``pip install -e ".[explore]"``), and the browser
tests when Chromium or its driver is missing (``apt-get install chromium chromium-driver``);
``.ci/run`` installs both. ``LAVA_EXPLORE_SCREENSHOT=docs/figures/explore.png`` saves the page
as the browser test leaves it (the README's picture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lava

pytest.importorskip("gradio", reason='the explore extra is not installed: pip install -e ".[explore]"')
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "lava" / "assets" / "examples"
SCENE = EXAMPLES / "scene_0.png"
CLASSES = "red square, blue triangle, yellow circle"
MAX_UPLOAD_MB = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """``lava explore`` in a subprocess on a free port; yields its URL, stops it after the module."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lava.cli",
            "explore",
            "--port",
            str(port),
            "--max-upload",
            f"{MAX_UPLOAD_MB}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            if line.startswith("lava: ready:"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180) or proc.poll() is not None:
        proc.kill()
        pytest.fail("lava explore did not start:\n" + "".join(log))
    url = f"http://127.0.0.1:{port}"
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    # Gradio logs the requests it refuses itself (a file path a client names, a slider value out of
    # range) with a traceback; nothing else may have raised
    text = "".join(log)
    raised = re.findall(r"^\w[\w.]*(?:Error|Exception)\b.*$", text, flags=re.MULTILINE)
    assert len(raised) == text.count("Traceback (most recent call last):"), text
    assert all(r.startswith("gradio.exceptions.") for r in raised), text
    assert f'File "{ROOT / "lava"}' not in text, text


@pytest.fixture(scope="module")
def expected():
    """``lava.segment`` on the shipped example with the model's defaults (what the app runs)."""
    return lava.segment(SCENE, CLASSES, backend=lava.load_backend("lava-shapes"))


def labels_of(path_or_url) -> np.ndarray:
    source = path_or_url
    if str(path_or_url).startswith("http"):
        with urllib.request.urlopen(path_or_url, timeout=30) as resp:
            import io

            source = io.BytesIO(resp.read())
    with Image.open(source) as im:
        assert im.mode == "P", "the label map is a palette PNG whose pixel values are the labels"
        return np.asarray(im)


# ---- the API ---------------------------------------------------------------------------------------


def test_api_segment_equals_lava_segment(server, expected, tmp_path):
    client = Client(server, verbose=False, download_files=str(tmp_path))
    assert "/segment" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    overlay, labels = client.predict(handle_file(SCENE), CLASSES, api_name="/segment")
    assert np.array_equal(labels_of(labels), expected.labels[0].numpy())
    with Image.open(overlay) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected.overlay(0)))


def test_api_errors_are_lavas_messages_and_the_server_keeps_serving(server, expected, tmp_path):
    client = Client(server, verbose=False, download_files=str(tmp_path))
    for classes, message in [
        ("red square, , blue circle", "class name #2 is blank: every class needs a name"),
        ("red square, RED SQUARE", "duplicate class name"),
    ]:
        with pytest.raises(Exception, match=message) as err:
            client.predict(handle_file(SCENE), classes, api_name="/segment")
        assert "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="no image: upload one or pick a shipped example"):
        client.predict(None, CLASSES, api_name="/segment")
    _, labels = client.predict(handle_file(SCENE), CLASSES, api_name="/segment")
    assert np.array_equal(labels_of(labels), expected.labels[0].numpy())


def test_clients_at_once_queue_and_all_succeed(server, expected, tmp_path):
    def one(i: int) -> np.ndarray:
        client = Client(server, verbose=False, download_files=str(tmp_path / str(i)))
        return labels_of(client.predict(handle_file(SCENE), CLASSES, api_name="/segment")[1])

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(np.array_equal(r, expected.labels[0].numpy()) for r in results)


def test_uploads_above_the_limit_are_refused(server, tmp_path):
    big = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big)  # ~1.4 MB
    assert big.stat().st_size > MAX_UPLOAD_MB * 1024 * 1024
    client = Client(server, verbose=False, download_files=str(tmp_path))
    with pytest.raises(Exception, match=r"(?i)too large|exceeds|maximum"):
        client.predict(handle_file(big), CLASSES, api_name="/segment")


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _call(server: str, endpoint: str, data: list) -> str:
    """Call an endpoint with raw JSON (as a hostile client could) and return its event stream."""
    request = urllib.request.Request(
        f"{server}/gradio_api/call/{endpoint}",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        event = json.loads(resp.read())["event_id"]
    with urllib.request.urlopen(f"{server}/gradio_api/call/{endpoint}/{event}", timeout=60) as resp:
        return resp.read().decode()


def test_no_file_outside_the_app_folder_can_be_read(server, tmp_path):
    outside = tmp_path / "secret.png"
    shutil.copyfile(SCENE, outside)
    for path in ("/etc/passwd", str(outside), str(SCENE), "../../../../etc/passwd"):
        assert _get(f"{server}/gradio_api/file={path}") in (403, 404), path
    # an image "input" that names a file on the server instead of uploading it
    for path in (outside, SCENE):
        named = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
        stream = _call(server, "segment", [named, CLASSES])
        assert "event: error" in stream and "api_labels" not in stream, stream


def explore_args(**changes) -> dict:
    """Keyword arguments of the ``/explore`` endpoint: the page's widgets at their defaults."""
    args = dict(
        image=handle_file(SCENE),
        classes=CLASSES,
        timestep=50,
        blocks=["0"],
        source="attention",
        direction="image_to_text",
        softmax="joint",
        tokens="all",
        seed=0,
        normalize="default",
        background="threshold",
        background_threshold=0.2,
        min_presence=0.3,
        refine="none",
    )
    args.update(changes)
    return args


def test_explore_endpoint_reuses_the_sessions_maps(server, tmp_path):
    """A change of mask settings re-uses the captured maps; a new timestep runs the model; bad
    values come back as lava's message in the status line."""
    backend = lava.load_backend("lava-shapes")
    client = Client(server, verbose=False, download_files=str(tmp_path))
    status, _, labels, gallery, files, _ = client.predict(**explore_args(), api_name="/explore")
    assert "1 model forward" in status and len(gallery) == 3 and len(files) == 4
    status, _, labels, *_ = client.predict(**explore_args(background_threshold=0.7), api_name="/explore")
    assert "no model run" in status
    seg = lava.segment(
        SCENE,
        CLASSES,
        backend=backend,
        timestep=50,
        layers=[0],
        background_threshold=0.7,
        min_presence=0.3,
        refine="none",
    )
    assert np.array_equal(labels_of(labels), seg.labels[0].numpy())
    status, *_ = client.predict(**explore_args(timestep=500, blocks=["1", "3"]), api_name="/explore")
    assert "1 model forward" in status
    # out of the slider's range: Gradio refuses it before lava sees it (lava's own check: test_explore.py)
    with pytest.raises(Exception, match="Value 1000 is greater than maximum value 999"):
        client.predict(**explore_args(timestep=1000), api_name="/explore")
    status, *_ = client.predict(**explore_args(blocks=[]), api_name="/explore")
    assert status == "**error:** no block selected: tick at least one of lava-shapes's blocks to read"
    status, grid = client.predict(
        **explore_args(),
        grid_class="blue triangle",
        grid_timesteps="100,500",
        grid_blocks=["1", "3"],
        api_name="/grid",
    )
    assert "2 timesteps × 3 columns for 'blue triangle': 1 model forward(s)" in status  # t=500 was cached
    with Image.open(grid) as im:
        assert im.width > im.height


# ---- the page, in a headless Chromium ---------------------------------------------------------------


def _chromium() -> tuple[str, str] | None:
    """Debian's Chromium and its WebDriver, when installed."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None
    )
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    found = _chromium()
    if found is None:
        pytest.skip("Chromium is not installed: apt-get install chromium chromium-driver (as .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    # the markdown only: while a request runs, the element also shows Gradio's progress text
    return driver.find_element(By.CSS_SELECTOR, "#status [data-testid=markdown]").text


def test_browser_upload_classes_run(server, browser, expected):
    """A person's first use: upload the shipped example, type its classes, press Segment; the
    overlay appears and the label map it offers equals ``lava.segment``. Then a bad class list
    shows lava's message in the page, and a corrected one runs again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server)
    upload = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
    upload.send_keys(str(SCENE))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    box = browser.find_element(By.CSS_SELECTOR, "#classes textarea")
    box.send_keys(CLASSES)
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    overlay = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#overlay img"))
    _wait(browser, lambda d: "model forward" in _status(d))
    assert "3 classes" in _status(browser)
    with urllib.request.urlopen(overlay.get_attribute("src"), timeout=30) as resp:
        import io

        with Image.open(io.BytesIO(resp.read())) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected.overlay(0)))
    label_src = browser.find_element(By.CSS_SELECTOR, "#labels img").get_attribute("src")
    assert np.array_equal(labels_of(label_src), expected.labels[0].numpy())
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    assert [h.rsplit("/", 1)[-1] for h in links] == [
        "scene_0_labels.png",
        "scene_0_overlay.png",
        "scene_0_classes.txt",
        "scene_0_scores.npz",
    ]
    assert np.array_equal(labels_of(links[0]), expected.labels[0].numpy())
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmaps img")) == 3

    shot = os.environ.get("LAVA_EXPLORE_SCREENSHOT")
    if shot:
        browser.set_window_size(1400, 1180)
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        browser.save_screenshot(shot)

    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("red square, , blue triangle", Keys.ENTER)
    _wait(browser, lambda d: "error" in _status(d))
    assert _status(browser) == "error: class name #2 is blank: every class needs a name"
    assert "Traceback" not in browser.page_source
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("red square, blue triangle", Keys.ENTER)
    _wait(browser, lambda d: _status(d).startswith("2 classes"))
    # a noise level out of range: lava's message; a good one runs there and moves the slider
    sigma = browser.find_element(By.CSS_SELECTOR, "#sigma input")
    sigma.send_keys(Keys.CONTROL, "a")
    sigma.send_keys("1.5", Keys.ENTER)
    _wait(browser, lambda d: "error" in _status(d))
    assert _status(browser) == "error: sigma must be in [0, 1), got 1.5"
    sigma.send_keys(Keys.CONTROL, "a")
    sigma.send_keys("0.3", Keys.ENTER)
    _wait(browser, lambda d: _status(d).startswith("2 classes · t = 300 (σ 0.300)"))
    slider = browser.find_element(By.CSS_SELECTOR, "#timestep input[type=number]")
    assert slider.get_attribute("value") == "300"


def test_browser_example_and_grid(server, browser):
    """Picking a shipped example fills in its classes and runs; the grid tab computes one class's
    map over the default timesteps × all blocks with one forward per timestep."""
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#example input")).click()
    option = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "[role=option][aria-label=scene_1]"))
    option.click()
    _wait(browser, lambda d: "model forward" in _status(d) or "no model run" in _status(d))
    classes = browser.find_element(By.CSS_SELECTOR, "#classes textarea").get_attribute("value")
    assert classes == "yellow square, green circle, red circle"
    assert _status(browser).startswith("3 classes")
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "[role=tab]") if "grid" in t.text).click()
    browser.find_element(By.CSS_SELECTOR, "#grid_run").click()
    _wait(
        browser,
        lambda d: "forward" in d.find_element(By.CSS_SELECTOR, "#grid_status [data-testid=markdown]").text,
    )
    grid_status = browser.find_element(By.CSS_SELECTOR, "#grid_status [data-testid=markdown]").text
    assert grid_status.startswith("5 timesteps × 5 columns for 'yellow square': 5 model forward(s)")
    assert browser.find_elements(By.CSS_SELECTOR, "#grid img")


def test_port_in_use_is_refused_before_the_model_loads(capsys):
    from lava.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["explore", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert (
        f"lava: error: cannot listen on 127.0.0.1:{port}: address already in use; pick another --port" in err
    )
    assert "using lava-shapes" not in err
