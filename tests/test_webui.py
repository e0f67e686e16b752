"""The web UI at ``/`` in a real browser (Playwright driving headless Chromium) against a real server on a
tiny random model: generate and watch progress, interrupt, see the image; upload an image, paint a mask
with the mouse and inpaint; reopen a past result from the history; drop a PNG and get its parameters.
A screenshot of each state goes to ``test-artifacts/webui/``.

Skipped when Playwright or a Chromium binary is missing (``.ci/run`` installs both: Debian's ``chromium``
package, since Playwright's own browser download needs the internet), unless ``SFUMATO_REQUIRE_BROWSER=1``
(``.ci/run`` sets it once Chromium is installed), which makes a missing one a failure. ``SFUMATO_CHROMIUM``
names another binary.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .server_util import running

REQUIRE_BROWSER = os.environ.get("SFUMATO_REQUIRE_BROWSER") == "1"
try:
    from playwright import sync_api
except ImportError:
    if REQUIRE_BROWSER:
        pytest.fail("SFUMATO_REQUIRE_BROWSER=1 but Playwright is not installed (pip install -e '.[test]')",
                    pytrace=False)
    pytest.skip("Playwright is not installed", allow_module_level=True)
httpx = pytest.importorskip("httpx")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "webui"
SIZE = 32
TIMEOUT_MS = 60_000


def _chromium() -> str | None:
    for candidate in (os.environ.get("SFUMATO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    from sfumato.server.app import ServerConfig

    config = ServerConfig(model=tiny_models / "sd1", models_dir=tiny_models,
                          data_dir=tmp_path_factory.mktemp("webui-data"))
    with running(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        why = "no Chromium binary (apt-get install chromium, or set SFUMATO_CHROMIUM)"
        if REQUIRE_BROWSER:
            pytest.fail(f"SFUMATO_REQUIRE_BROWSER=1 but {why}", pytrace=False)
        pytest.skip(why)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@contextlib.contextmanager
def _open(browser, url: str):
    """The web page of the server at ``url``, ready (lists loaded); no script error may happen on it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, server):
    with _open(browser, server.url) as p:
        yield p


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _small(page, steps: int) -> None:
    """Sizes and steps the tiny model runs fast with, and a sampler every model has."""
    page.fill("#width", str(SIZE))
    page.fill("#height", str(SIZE))
    page.fill("#steps", str(steps))
    page.select_option("#sampler", "Euler")


def _png(img: Image.Image, parameters: str | None = None) -> bytes:
    from sfumato.metadata import png_info

    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    return buf.getvalue()


def _loaded(page, selector: str) -> None:
    page.wait_for_function("(s) => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
                           arg=selector)


def test_generate_progress_interrupt_and_image(page):
    assert page.locator("#sampler option").count() > 5  # lists come from the server
    assert page.locator("#model option").first.inner_text() == "sd1"
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    page.fill("#prompt", "a lighthouse at dusk")
    _small(page, 5000)
    page.click("#generate")
    page.wait_for_selector("#steps-done:has-text('step')")
    _loaded(page, "#images img.preview")
    assert page.locator("#progress").evaluate("p => p.value") > 0
    assert page.is_enabled("#interrupt") and page.is_disabled("#generate")
    _shot(page, "01-progress")
    page.click("#interrupt")
    page.wait_for_selector("#status:has-text('Interrupted')")
    assert page.is_enabled("#generate")

    page.fill("#steps", "4")
    page.fill("#seed", "1234")
    page.click("#generate")
    page.wait_for_selector("#status:has-text('Done')")
    _loaded(page, "#images img")
    assert "a lighthouse at dusk" in page.inner_text("#info")
    assert "Seed: 1234" in page.inner_text("#info")
    src = page.locator("#images img").first.get_attribute("src")
    assert Image.open(io.BytesIO(httpx.get(page.url.rstrip("/") + src).content)).size == (SIZE, SIZE)
    _shot(page, "02-generated")

    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1234"


def test_draw_a_mask_and_inpaint(page):
    page.click("#tab-inpaint")
    assert page.get_attribute("#tab-inpaint", "aria-selected") == "true"
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    page.set_input_files("#init-file", files=[{"name": "init.png", "mimeType": "image/png", "buffer": _png(init)}])
    _loaded(page, "#init-img")
    assert page.input_value("#width") == str(SIZE)
    page.fill("#prompt", "a red door")
    _small(page, 4)
    page.click("#generate")  # no mask yet: the page says so instead of sending
    page.wait_for_selector("#status:has-text('paint a mask')")

    page.locator("#mask").scroll_into_view_if_needed()
    box = page.locator("#mask").bounding_box()
    x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
    page.fill("#brush", "60")
    page.mouse.move(x0 + 0.3 * w, y0 + 0.3 * h)
    page.mouse.down()
    for t in np.linspace(0, 1, 12):
        page.mouse.move(x0 + (0.3 + 0.4 * t) * w, y0 + (0.3 + 0.4 * t) * h)
    page.mouse.up()
    alpha = page.evaluate("() => { const c = document.getElementById('mask'); const d = c.getContext('2d')"
                          ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
                          "for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [n, c.width * c.height]; }")
    assert 0 < alpha[0] < alpha[1]  # some of the image is masked, not all
    _shot(page, "03-mask-drawn")

    page.click("#generate")
    page.wait_for_selector("#status:has-text('Done')")
    _loaded(page, "#images img")
    info = page.inner_text("#info")
    assert "a red door" in info and "Denoising strength" in info and "Mask blur" in info
    _shot(page, "04-inpainted")


def test_reopen_a_past_result_from_the_history(page, server):
    job = httpx.post(server.url + "/api/v1/jobs", json={"prompt": "an old harbour", "width": SIZE, "height": SIZE,
                                                         "steps": 3, "seed": 99, "sampler_name": "Euler",
                                                         "cfg_scale": 5.5}, timeout=30).json()
    with httpx.stream("GET", server.url + job["events"], timeout=60) as stream:
        for _ in stream.iter_lines():
            pass
    page.click("#history-refresh")
    item = page.locator(f"#gallery button[data-job='{job['id']}']")
    item.wait_for()
    item.click()
    _loaded(page, "#images img")
    assert "an old harbour" in page.inner_text("#info") and "Seed: 99" in page.inner_text("#info")
    assert item.get_attribute("aria-current") == "true"
    _shot(page, "05-history-reopened")

    page.click("#reuse")
    assert page.input_value("#prompt") == "an old harbour"
    assert page.input_value("#seed") == "99" and page.input_value("#cfg") == "5.5"
    assert page.input_value("#sampler") == "Euler"


def test_drop_a_png_to_read_its_parameters(page):
    text = ("a quiet forest\nNegative prompt: blurry\nSteps: 17, Sampler: Euler, Schedule type: Karras, "
            "CFG scale: 6.5, Seed: 4242, Size: 48x40, Model: sd1")
    data = base64.b64encode(_png(Image.new("RGB", (16, 16), "gray"), text)).decode()
    transfer = page.evaluate_handle(
        """(b64) => { const bin = atob(b64); const bytes = new Uint8Array(bin.length);
           for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
           const dt = new DataTransfer(); dt.items.add(new File([bytes], "old.png", {type: "image/png"}));
           return dt; }""", data)
    page.dispatch_event("#history", "dragenter", {"dataTransfer": transfer})
    page.dispatch_event("#history", "dragover", {"dataTransfer": transfer})
    assert page.is_visible("#drop-overlay")
    _shot(page, "06-drag-over")
    page.dispatch_event("#history", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#status:has-text('Read the parameters')")
    assert page.input_value("#prompt") == "a quiet forest"
    assert page.input_value("#negative") == "blurry"
    assert page.input_value("#steps") == "17" and page.input_value("#seed") == "4242"
    assert page.input_value("#width") == "48" and page.input_value("#height") == "40"
    assert page.input_value("#cfg") == "6.5" and page.input_value("#schedule") == "karras"
    assert not page.is_visible("#drop-overlay")
    _shot(page, "07-png-parameters")


def test_width_and_height_follow_the_selected_model(browser, tiny_models, tmp_path):
    """The built-in model (the server's default) makes 64x64 images with cfg 2, the tiny SD 1.x model 512x512
    with cfg 7: the size and CFG fields follow the picked model until the user types a value; a model of
    unknown size leaves them alone."""
    from sfumato.server.app import ServerConfig
    from sfumato.weights.load import builtin_checkpoint

    models = tmp_path / "models"
    models.mkdir()
    (models / "sd1").symlink_to(tiny_models / "sd1", target_is_directory=True)
    (models / "unknown.safetensors").write_bytes(b"not a checkpoint")
    config = ServerConfig(model=builtin_checkpoint(), models_dir=models, data_dir=tmp_path / "data")
    size = lambda p: (p.input_value("#width"), p.input_value("#height"))  # noqa: E731
    with running(config) as srv, _open(browser, srv.url) as page:
        assert page.input_value("#model") == "model.safetensors"
        assert size(page) == ("64", "64") and page.input_value("#cfg") == "2"
        page.select_option("#model", "sd1")
        assert size(page) == ("512", "512") and page.input_value("#cfg") == "7"
        page.select_option("#model", "unknown.safetensors")
        assert size(page) == ("512", "512") and not page.is_visible("#size-native")
        page.select_option("#model", "model.safetensors")
        assert size(page) == ("64", "64")
        assert "64×64" in page.inner_text("#size-hint")

        page.fill("#width", "48")  # the user's size stays
        page.select_option("#model", "sd1")
        assert size(page) == ("48", "64")
        page.click("#size-native")  # until they ask for the model's again
        assert size(page) == ("512", "512")
        page.select_option("#model", "model.safetensors")
        assert size(page) == ("64", "64") and page.input_value("#cfg") == "2"
        page.fill("#cfg", "4.5")  # the user's guidance stays too
        page.select_option("#model", "sd1")
        assert page.input_value("#cfg") == "4.5"
        _shot(page, "08-model-size")


def test_hires_fix_from_the_page(page):
    assert page.is_disabled("#hr-scale")  # hires options wait for the checkbox
    upscalers = page.locator("#hr-upscaler option").all_inner_texts()
    assert upscalers[0] == "Latent" and "Latent (bicubic antialiased)" in upscalers and "Lanczos" in upscalers
    page.fill("#prompt", "a windmill")
    _small(page, 3)
    page.fill("#seed", "5")
    page.check("#enable-hr")
    page.fill("#hr-scale", "1.5")
    page.fill("#hr-steps", "2")
    page.fill("#hr-strength", "0.55")
    page.fill("#clip-skip", "2")
    assert page.input_value("#hr-upscaler") == "Latent"
    assert page.inner_text("#hr-size") == f"{SIZE}×{SIZE} → 48×48."
    _shot(page, "09-hires-controls")
    page.click("#generate")
    page.wait_for_selector("#status:has-text('Done')")
    _loaded(page, "#images img")
    info = page.inner_text("#info")
    for field in ("Hires upscale: 1.5", "Hires steps: 2", "Hires upscaler: Latent", "Denoising strength: 0.55",
                  f"Size: {SIZE}x{SIZE}", "Clip skip: 2", "Seed: 5"):
        assert field in info, (field, info)
    src = page.locator("#images img").first.get_attribute("src")
    assert Image.open(io.BytesIO(httpx.get(page.url.rstrip("/") + src).content)).size == (48, 48)
    _shot(page, "10-hires-generated")

    page.uncheck("#enable-hr")  # reusing the result's parameters turns hires fix back on with its values
    page.fill("#clip-skip", "1")
    page.click("#reuse")
    assert page.is_checked("#enable-hr") and page.input_value("#hr-scale") == "1.5"
    assert page.input_value("#hr-strength") == "0.55" and page.input_value("#clip-skip") == "2"


def test_refiner_from_the_page(page):
    assert page.locator("#refiner option").all_inner_texts() == ["None", "sd1", "sd1b"]
    assert page.is_disabled("#refiner-switch")
    page.fill("#prompt", "a tower")
    _small(page, 4)
    page.select_option("#refiner", "sd1b")
    page.fill("#refiner-switch", "0.5")
    page.check("#enable-hr")  # the server runs one or the other: the page says so instead of sending
    page.click("#generate")
    page.wait_for_selector("#status:has-text('cannot run together')")
    page.uncheck("#enable-hr")
    page.click("#generate")
    page.wait_for_selector("#status:has-text('Done')")
    info = page.inner_text("#info")
    assert "Refiner: sd1b" in info and "Refiner switch at: 0.5" in info and "Hires" not in info
