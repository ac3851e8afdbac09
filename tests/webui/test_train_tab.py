"""The Train tab in a real server: the whole loop in Debian's chromium on the toy world (the API: test_api.py)."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import webui_server

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = sorted((ROOT / "assets" / "subject").glob("*.png"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """python -m webui --demo on an empty adapters folder: the pretrained toy world is the base model."""
    root = tmp_path_factory.mktemp("train-tab")
    adapters = root / "adapters"
    adapters.mkdir()
    log = root / "server.log"
    server = webui_server(log, "--adapters", str(adapters), "--demo", "--output_dir", str(root / "images"))
    with server as (url, _, process):
        yield {"url": url, "root": root, "adapters": adapters, "log": log, "process": process}


def test_the_whole_loop_in_a_real_browser(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        flags = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server["url"])
        page.wait_for_selector("#generate", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        page.set_input_files("#train-files input[type=file]", [str(p) for p in SUBJECT])
        page.wait_for_function("document.querySelectorAll('#train-images img').length === 5", timeout=60_000)
        assert page.locator("#preset input").input_value().startswith("toy world on a CPU")
        assert page.locator("#sample-prompt textarea").input_value() == "a sks circle on a gray background"
        page.get_by_text("Advanced").click()
        for field, value in (("#adv-steps", "30"), ("#adv-every", "10"), ("#adv-class-count", "4")):
            page.locator(f"{field} input").fill(value)
            page.locator(f"{field} input").press("Tab")
        page.wait_for_function("document.querySelector('#plan').innerText.startsWith('30 steps of "
                               "batch 2 on 5 images at 32 px')",
                               timeout=30_000)
        page.click("#train-start")
        page.wait_for_function("document.querySelector('#train-state') && /step [1-9]/.test("
                               "document.querySelector('#train-state').innerText)", timeout=180_000)
        page.wait_for_selector("#samples img", timeout=180_000)  # a validation sample, while it trains
        page.wait_for_selector("#loss-plot canvas, #loss-plot svg", timeout=30_000)
        shot = server["root"] / "train-tab.png"
        page.screenshot(path=str(shot), full_page=True)
        page.wait_for_selector("#use-adapter", state="visible", timeout=300_000)  # done
        assert "done · step 30 of 30" in page.locator("#train-state").inner_text()
        assert "MoSLoRA DreamBooth adapter" in page.locator("#model-card").inner_text()
        page.click("#use-adapter")  # to the Generate tab, adapter chosen and prompt filled in
        # filled with the run's sample prompt (the toy preset's: the subject on a background its photos never show)
        page.wait_for_function("document.querySelector('#prompt textarea').value === 'a "
                               "sks circle on a gray background'",
                               timeout=30_000)
        page.wait_for_function("document.querySelector('#details').innerText.includes('moslora_adapter.safetensors')",
                               timeout=30_000)
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 1", timeout=120_000)
        assert "image(s) from" in page.locator("#status").inner_text()
        browser.close()
    keep = os.environ.get("TRAIN_TAB_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    assert Image.open(shot).size[0] == 1400
    assert "Traceback" not in server["log"].read_text()


def test_the_model_card_on_the_page_leaves_out_its_header_and_pictures(tmp_path):
    from dreambooth_moslora.training.model_card import write_model_card
    from webui.train_tab import model_card_text

    settings = {"pretrained_model_name_or_path": "base", "instance_prompt": "a sks dog",
                "validation_prompt": "a sks dog in snow", "rank": 4, "num_train_images": 5}
    grid = tmp_path / "validation.png"
    write_model_card(tmp_path, settings, {"diffusers": tmp_path / "pytorch_lora_weights.safetensors"}, grid)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "![validation](validation.png)" in card and "`a sks dog in snow`" in card
    shown = model_card_text(tmp_path)
    assert shown.startswith("# MoSLoRA DreamBooth adapter for base") and "| rank | 4 |" in shown
    assert 'image = pipe("a sks dog in snow"' in shown  # the example uses the prompt the run sampled with
    assert "Validation images" not in shown and "![" not in shown  # the page shows the samples itself
    assert model_card_text(tmp_path / "missing") == ""
