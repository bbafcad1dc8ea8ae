"""The web page in a real browser: headless Debian chromium + chromium-driver, driven by selenium.

Upload an image and see its caption, ask about it in the chat, search the index and see the gallery; a
screenshot is saved and checked (size, not blank, the caption visible). Skipped when the browser binaries are
not installed (``make test`` installs them with apt when it can).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlbridge.serving import ServeSettings, create_app

from serve_support import ServerThread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or (
    "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").exists() else None
)
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "the browser test needs chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000")
    for flag in flags:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_captions_chats_and_searches(browser, model, index, photos, tmp_path):
    with ServerThread(create_app(model, index, ServeSettings(model_name="tiny-served"))) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-name"), "tiny-served"))

        # Upload: the hidden file input takes a path from the test (the browser reads it, not the server).
        browser.find_element(By.ID, "file-input").send_keys(str(photos / "img0.png"))
        caption = browser.find_element(By.ID, "caption")
        wait.until(lambda d: caption.text.strip() not in ("", "…"))
        assert browser.find_element(By.ID, "image-error").text == ""
        assert caption.is_displayed()
        expected = model.caption([str(photos / "img0.png")])[0]
        assert caption.text.strip() == expected

        browser.find_element(By.ID, "chat-input").send_keys("what colour is it?")
        browser.find_element(By.ID, "chat-send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")) == 1)
        assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg.error")

        browser.find_element(By.ID, "search-input").send_keys("a red circle")
        browser.find_element(By.ID, "search-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result img")) == len(index))
        wait.until(
            lambda d: all(
                d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                for img in d.find_elements(By.CSS_SELECTOR, "#gallery .result img")
            )
        )
        labels = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
        expected_paths = [h.path for h in index.search("a red circle", k=12)]
        assert [label.split(" · ")[0] for label in labels] == expected_paths
        assert "of 6 images" in browser.find_element(By.ID, "search-status").text

        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        image = Image.open(shot).convert("RGB")
        assert image.width >= 800 and image.height >= 600
        pixels = np.asarray(image, dtype=np.float32)
        assert pixels.std() > 10, "the screenshot is blank"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, thumbnails and panels, not a flat fill
        box = caption.rect  # the caption element is on screen with non-zero size
        assert box["width"] > 0 and box["height"] > 0 and box["y"] < image.height
