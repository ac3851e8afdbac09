"""The web demo: the handlers on the tiny SDXL, then the real server through its API and a real browser."""

import hashlib
import json
import os
import shutil
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_moslora import AdapterConfig, inject_components, pipeline_components, save_adapter
from dreambooth_moslora.sdxl import max_abs_diff, sdxl_forward
from toyworld.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl
from webui.engine import Engine, Request, RequestError

from tests.conftest import randomize_adapter_
from tests.helpers import webui_server

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(width=64, height=64, steps=3, seed=7)


def make_adapter(folder: Path, seed: int, formats=("native", "diffusers", "kohya")) -> None:
    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    torch.manual_seed(seed)
    inject_components(components, AdapterConfig(rank=4, alpha=4.0))
    randomize_adapter_(components, seed=seed, std=0.2)
    save_adapter(folder, components, formats=formats, base_model="elsewhere/no-such-model",
                 training={"instance_prompt": f"a photo of sks thing{seed}", "max_train_steps": 10 * seed,
                           "validation_prompt": f"a photo of sks thing{seed} on a beach" if seed == 2 else None})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    model = save_tiny_sdxl(root / "random-sdxl", seed=0)
    adapters = root / "adapters"
    make_adapter(adapters / "run_a", seed=1)
    make_adapter(adapters / "run_b", seed=2, formats=("native",))
    make_adapter(adapters / "run_a" / "checkpoint-2", seed=3, formats=("native",))  # checkpoints are not listed
    (adapters / "broken_lora.safetensors").write_bytes(b"\x80\x04not safetensors at all")
    shutil.copytree(model / "unet", adapters / "some-model-unet")  # model weights: not an adapter, not listed
    secret = root / "secret.safetensors"
    shutil.copy(adapters / "run_b" / "moslora_adapter.safetensors", secret)
    (adapters / "link.safetensors").symlink_to(secret)  # points outside the folder
    # hostile files: the server must list them as unreadable and keep serving
    raw = json.dumps({"unet.a.lora_A.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    (adapters / "dtype_list_lora.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    deep = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (adapters / "deep_lora.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    (adapters / "loop_a.safetensors").symlink_to(adapters / "loop_b.safetensors")
    (adapters / "loop_b.safetensors").symlink_to(adapters / "loop_a.safetensors")
    (adapters / "self.safetensors").symlink_to(adapters / "self.safetensors")
    return {"root": root, "model": model, "adapters": adapters}


@pytest.fixture(scope="module")
def engine(world):
    return Engine(world["adapters"], demo_model=str(world["model"]), output_dir=world["root"] / "images")


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.path).convert("RGB"), dtype=np.int16)


def test_adapter_list_with_metadata_and_unreadable_files(engine):
    entries = {e.id: e for e in engine.adapters()}
    assert set(entries) == {
        "run_a/moslora_adapter.safetensors", "run_a/pytorch_lora_weights.safetensors",
        "run_a/pytorch_lora_weights_kohya.safetensors", "run_b/moslora_adapter.safetensors",
        "broken_lora.safetensors", "link.safetensors", "dtype_list_lora.safetensors", "deep_lora.safetensors",
        "loop_a.safetensors", "loop_b.safetensors", "self.safetensors",
    }
    native = entries["run_a/moslora_adapter.safetensors"]
    assert native.format == "native" and native.error is None
    assert native.info["instance_prompt"] == "a photo of sks thing1" and native.info["steps"] == 10
    assert (native.info["rank"], native.info["alpha"], native.info["mixer"]) == (4, "4", "learned")
    kohya = entries["run_a/pytorch_lora_weights_kohya.safetensors"]
    assert kohya.format == "kohya" and kohya.info["instance_prompt"] == "a photo of sks thing1"
    # the Generate tab pre-fills the prompt the run sampled with, else the instance prompt
    assert native.suggested_prompt == "a photo of sks thing1"
    assert entries["run_b/moslora_adapter.safetensors"].suggested_prompt == "a photo of sks thing2 on a beach"
    assert "not a safetensors file" in entries["broken_lora.safetensors"].error
    assert entries["link.safetensors"].error == "links outside the adapters folder"
    assert "unreadable" in entries["broken_lora.safetensors"].label
    assert "malformed safetensors entry" in entries["dtype_list_lora.safetensors"].error
    assert "not JSON" in entries["deep_lora.safetensors"].error
    assert {entries[f"{n}.safetensors"].error for n in ("loop_a", "loop_b", "self")} == {"a symbolic link loop"}


@pytest.mark.parametrize(
    "bad_id",
    ["../secret.safetensors", str(Path("/etc/passwd")), "run_a/../../secret.safetensors", "link.safetensors",
     "run_a", "tiny-sdxl/../../etc/hosts", ""],
)
def test_only_files_under_the_folder_can_be_loaded(engine, bad_id):
    with pytest.raises(RequestError):
        engine.generate(Request(prompt="a photo", adapters=[bad_id], **SMALL))


def test_base_adapter_compare_scale_and_png_metadata(engine, world):
    base = engine.generate(Request(prompt="a photo of sks thing1", **SMALL))
    assert len(base) == 1 and base[0].parameters["adapter"] is None
    a = engine.generate(Request(prompt="a photo of sks thing1", adapters=["run_a/moslora_adapter.safetensors"],
                                **SMALL))
    assert np.abs(pixels(a[0]) - pixels(base[0])).mean() > 2  # the adapter changes the picture

    both = engine.generate(Request(prompt="a photo of sks thing1", adapters=["run_a/moslora_adapter.safetensors",
                                   "run_b/moslora_adapter.safetensors"], compare=True, **SMALL))
    assert [r.label.split(" · ")[0] for r in both] == ["base model", "run_a/moslora_adapter", "run_b/moslora_adapter"]
    assert np.array_equal(pixels(both[0]), pixels(base[0])) and np.array_equal(pixels(both[1]), pixels(a[0]))

    zero = engine.generate(Request(prompt="a photo of sks thing1", adapters=["run_a/moslora_adapter.safetensors"],
                                   scale=0.0, **SMALL))
    half = engine.generate(Request(prompt="a photo of sks thing1", adapters=["run_a/moslora_adapter.safetensors"],
                                   scale=0.5, **SMALL))
    assert np.array_equal(pixels(zero[0]), pixels(base[0]))
    assert np.abs(pixels(half[0]) - pixels(a[0])).mean() > 0.5
    assert np.abs(pixels(half[0]) - pixels(base[0])).mean() > 0.5

    png = Image.open(a[0].path)
    assert png.text["parameters"].startswith("a photo of sks thing1\nNegative prompt: \nSteps: 3, Sampler: Euler")
    saved = json.loads(png.text["dreambooth_moslora"])
    file_sha = hashlib.sha256((world["adapters"] / "run_a" / "moslora_adapter.safetensors").read_bytes()).hexdigest()
    assert saved["adapter_sha256"] == file_sha[:12] and saved["seed"] == 7 and saved["adapter_scale"] == 1.0
    assert f"Lora hash: {file_sha[:12]}" in png.text["parameters"]


def test_swapping_adapters_leaves_no_trace(engine):
    engine.generate(Request(prompt="warm up", **SMALL))
    pipe = engine._pipe
    before = sdxl_forward(pipe, "a photo of sks thing1")
    for adapter in ("run_a/pytorch_lora_weights_kohya.safetensors", "run_b/moslora_adapter.safetensors"):
        engine.generate(Request(prompt="a photo of sks thing1", adapters=[adapter], **SMALL))
    assert max_abs_diff(before, sdxl_forward(pipe, "a photo of sks thing1")) <= 1e-5
    again = engine.generate(Request(prompt="a photo of sks thing1", **SMALL))
    first = engine.generate(Request(prompt="a photo of sks thing1", **SMALL))
    assert np.array_equal(pixels(again[0]), pixels(first[0]))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt="  "), "prompt is empty"),
        (dict(width=100), "multiples of 8"),
        (dict(scale=2.0), "scale"),
        (dict(num_images=9), "images"),
        (dict(adapters=["run_a/moslora_adapter.safetensors", "run_b/moslora_adapter.safetensors"]), "compare mode"),
        (dict(scheduler="Heun"), "unknown scheduler"),
        (dict(adapters=["broken_lora.safetensors"]), "cannot be used"),
        (dict(base_model="no/such-model-anywhere"), "not one this server offers"),  # a hub id while offline
    ],
)
def test_bad_requests_are_refused_with_a_message(engine, change, message):
    request = Request(**{**dict(prompt="a photo", **SMALL), **change})
    with pytest.raises(RequestError, match=message):
        engine.generate(request)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(width=float("nan")), "multiples of 8"),
        (dict(steps=float("nan")), "steps"),
        (dict(steps="12; rm -rf /"), "steps"),
        (dict(guidance=float("inf")), "guidance"),
        (dict(seed=2**70), "seed"),
        (dict(seed=-5), "seed"),
        (dict(num_images=True), "images"),
        (dict(scale="abc"), "scale"),
        (dict(prompt=None), "prompt is empty"),
        (dict(adapters="run_a/moslora_adapter.safetensors"), "list of adapter names"),
        (dict(compare=True, adapters=["run_a/moslora_adapter.safetensors"] * 5), "at most 4 adapters"),
        (dict(base_model="../outside/model"), "not one this server offers"),
    ],
    ids=["nan-width", "nan-steps", "text-steps", "inf-guidance", "seed-2**70", "seed-negative", "bool-count",
         "text-scale", "no-prompt", "adapters-not-a-list", "compare-30", "base-outside"],
)
def test_hostile_numbers_and_fields_are_refused_with_one_line(engine, change, message):
    request = Request(**{**dict(prompt="a photo", **SMALL), **change})
    with pytest.raises(RequestError, match=message) as excinfo:
        engine.generate(request)
    assert "\n" not in str(excinfo.value)


def test_a_failed_base_model_load_leaves_the_engine_working(world):
    models = world["root"] / "models"
    (models / "broken").mkdir(parents=True, exist_ok=True)
    (models / "broken" / "model_index.json").write_text("{}")
    engine = Engine(world["adapters"], demo_model=str(world["model"]), output_dir=world["root"] / "images-2",
                    models_dir=models)
    first = engine.generate(Request(prompt="a photo", **SMALL))
    with pytest.raises(RequestError, match="cannot load base model"):
        engine.generate(Request(prompt="a photo", base_model="broken", **SMALL))
    again = engine.generate(Request(prompt="a photo", **SMALL))  # the demo model loads again
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert engine.base_models() == [str(world["model"]), "broken"]


def test_adapter_metadata_never_overrides_the_operators_base_model(world, tmp_path):
    other = save_tiny_sdxl(tmp_path / "other-sdxl", seed=5)  # a real model an adapter records as its base
    adapters = tmp_path / "adapters"
    pipe = build_tiny_sdxl(seed=0)
    inject_components(pipeline_components(pipe), AdapterConfig(rank=4))
    save_adapter(adapters / "run", pipeline_components(pipe), formats=["native"], base_model=str(other))
    engine = Engine(adapters, base_model=str(world["model"]), output_dir=tmp_path / "images")
    result = engine.generate(Request(prompt="a photo", adapters=["run/moslora_adapter.safetensors"], **SMALL))
    assert result[0].parameters["base_model"] == str(world["model"])
    with pytest.raises(RequestError, match="not one this server offers"):
        engine.generate(Request(prompt="a photo", base_model=str(other), **SMALL))


def test_models_dir_offers_sdxl_checkpoint_files_as_bases(world, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from dreambooth_moslora.single_file import save_single_file

    models = tmp_path / "models"
    models.mkdir()
    pipe = StableDiffusionXLPipeline.from_pretrained(world["model"])
    save_single_file({p: getattr(pipe, p) for p in ("unet", "vae", "text_encoder", "text_encoder_2")},
                     models / "tiny-xl.safetensors", dtype=torch.float32)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(1, 1)}, models / "some_lora.safetensors")  # not a base
    (models / "notes.safetensors").write_bytes(b"not safetensors")
    engine = Engine(world["adapters"], demo_model=str(world["model"]), output_dir=tmp_path / "images",
                    models_dir=models, base_config=str(world["model"]))
    assert engine.base_models() == [str(world["model"]), "tiny-xl.safetensors"]
    from_file = engine.generate(Request(prompt="a photo", base_model="tiny-xl.safetensors", **SMALL))
    assert from_file[0].parameters["base_model"] == str(models / "tiny-xl.safetensors")
    from_folder = engine.generate(Request(prompt="a photo", **SMALL))
    assert np.abs(pixels(from_file[0]) - pixels(from_folder[0])).max() <= 2  # the same weights (rounding aside)
    with pytest.raises(RequestError, match="not one this server offers"):
        engine.generate(Request(prompt="a photo", base_model="some_lora.safetensors", **SMALL))


def test_an_adapter_used_on_another_base_than_it_records_is_warned_about(world, tmp_path):
    from dreambooth_moslora.safe_files import base_hashes

    adapters = tmp_path / "adapters"
    pipe = build_tiny_sdxl(seed=0)
    inject_components(pipeline_components(pipe), AdapterConfig(rank=4))
    own = base_hashes(world["model"])["sha256"]
    for name, digest in (("same", own), ("other", "ab" * 32)):
        save_adapter(adapters / name, pipeline_components(pipe), formats=["kohya"], base_model="elsewhere/xl",
                     training={"base_model_sha256": digest})
    engine = Engine(adapters, demo_model=str(world["model"]), output_dir=tmp_path / "images")
    same = engine.generate(Request(prompt="a photo", adapters=["same/pytorch_lora_weights_kohya.safetensors"], **SMALL))
    assert "warning" not in same[0].parameters
    other = engine.generate(Request(prompt="a photo", adapters=["other/pytorch_lora_weights_kohya.safetensors"],
                                    compare=True, **SMALL))
    base_image, adapter_image = other
    assert "warning" not in base_image.parameters  # the base model's own image
    warning = adapter_image.parameters["warning"]
    assert "was trained on another base (elsewhere/xl, AutoV2 ABABABABAB)" in warning
    assert f"(AutoV2 {own[:10].upper()})" in warning


def test_an_adapters_new_tokens_stand_for_its_abstraction_in_prompts(world, tmp_path):
    from dreambooth_moslora.embeddings import NewTokens, save_embeddings

    pipe = build_tiny_sdxl(seed=0)
    components = pipeline_components(pipe)
    inject_components(components, AdapterConfig(rank=4))
    randomize_adapter_(components, seed=4, std=0.2)
    new = NewTokens.plan("TOK", 2)
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    rows = {key: torch.randn(2, width, generator=torch.Generator().manual_seed(5)) for key, width in
            zip(("clip_l", "clip_g"), widths)}
    save_adapter(tmp_path / "adapters" / "pet", components, formats=["kohya"], embeddings=(rows, new),
                 training={"instance_prompt": "a photo of <s0><s1>"})
    save_embeddings(tmp_path / "adapters" / "pet" / "adapter_emb.safetensors", rows, new)  # as the trainer writes
    engine = Engine(tmp_path / "adapters", demo_model=str(world["model"]), output_dir=tmp_path / "images")
    assert [a.id for a in engine.adapters()] == ["pet/pytorch_lora_weights_kohya.safetensors"]  # the _emb: not listed
    adapter = ["pet/pytorch_lora_weights_kohya.safetensors"]
    by_name, by_tokens, without = (engine.generate(Request(prompt=p, adapters=adapter, **SMALL))[0]
                                   for p in ("a photo of TOK", "a photo of <s0><s1>", "a photo of a circle"))
    assert np.array_equal(pixels(by_name), pixels(by_tokens))  # TOK is written as its tokens
    assert not np.array_equal(pixels(by_name), pixels(without))
    assert "warning" not in by_name.parameters and "warning" not in by_tokens.parameters
    assert without.parameters["warning"].startswith("the prompt does not mention TOK (<s0><s1>)")
    import gradio as gr

    from webui.app import GenerateTab

    with gr.Blocks(), gr.Tabs():
        tab = GenerateTab(engine, 64)
    details = tab.on_select(adapter)[1]
    assert "“a photo of &lt;s0&gt;&lt;s1&gt;”" in details  # the page shows the tokens, not empty HTML tags
    base = engine.generate(Request(prompt="a photo of TOK", **SMALL))[0]  # the tokens leave with the adapter
    assert len(engine.pipeline(str(world["model"])).tokenizer) == len(pipe.tokenizer)
    assert "warning" not in base.parameters


def test_an_adapter_trained_with_v_prediction_and_zero_terminal_snr_samples_with_them(world, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    adapters = tmp_path / "adapters"
    pipe = build_tiny_sdxl(seed=0)
    inject_components(pipeline_components(pipe), AdapterConfig(rank=4))
    save_adapter(adapters / "vpred", pipeline_components(pipe), formats=["kohya"],
                 training={"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    seen, real_call = [], StableDiffusionXLPipeline.__call__

    def watched(pipe, *args, **kwargs):  # what each image is drawn with
        seen.append((dict(pipe.scheduler.config), kwargs.get("guidance_rescale")))
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", watched)
    engine = Engine(adapters, demo_model=str(world["model"]), output_dir=tmp_path / "images")
    engine.generate(Request(prompt="a photo", adapters=["vpred/pytorch_lora_weights_kohya.safetensors"], compare=True,
                            **SMALL))
    (base_config, base_rescale), (adapter_config, adapter_rescale) = seen
    assert base_config["prediction_type"] == "epsilon" and base_rescale == 0.0  # the base model as it is
    assert adapter_config["prediction_type"] == "v_prediction" and adapter_config["rescale_betas_zero_snr"]
    assert adapter_config["timestep_spacing"] == "trailing" and adapter_rescale == 0.7


def test_a_request_that_runs_too_long_is_cut_off_and_the_next_one_works(world):
    engine = Engine(world["adapters"], demo_model=str(world["model"]), output_dir=world["root"] / "images-3",
                    time_limit=0.0)
    with pytest.raises(RequestError, match="cut off"):
        engine.generate(Request(prompt="a photo", adapters=["run_a/moslora_adapter.safetensors"], **SMALL))
    assert engine._loaded is None  # the adapter was taken out again
    engine.time_limit = 600.0
    assert len(engine.generate(Request(prompt="a photo", **SMALL))) == 1


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server(world):
    shutil.copytree(world["model"], world["adapters"] / "random-sdxl", dirs_exist_ok=True)  # what --demo looks for
    log = world["root"] / "server.log"
    server = webui_server(log, "--adapters", str(world["adapters"]), "--demo", "--queue_size", "12")
    with server as (url, port, process):
        yield {"url": url, "port": port, "log": log, "process": process}


def test_server_listens_on_localhost_only(server):
    assert f"http://127.0.0.1:{server['port']}" in server["log"].read_text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server["port"])) == 0


def test_twenty_simultaneous_api_requests(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    choices = ["run_a/moslora_adapter.safetensors", "run_b/moslora_adapter.safetensors", None]

    def ask(i):
        adapter = choices[i % 3]
        try:
            result = client.predict("a photo of sks thing1", adapters=[adapter] if adapter else [], steps=3, seed=11,
                                    width=64, height=64, api_name="/generate")
        except Exception as exc:  # a refusal must be a clean error, not a broken server
            return i, adapter, None, str(exc)
        return i, adapter, np.asarray(Image.open(result["images"][0]).convert("RGB"), dtype=np.int16), result["seeds"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(20)))
    done = [a for a in answers if a[2] is not None]
    refused = [a for a in answers if a[2] is None]
    assert len(done) + len(refused) == 20 and len(done) >= 12
    for _, _, _, reason in refused:
        assert "queue" in reason.lower() or "full" in reason.lower(), reason
    by_adapter = {}
    for _, adapter, image, _ in done:  # no mixing: one adapter, one picture, whatever the order of requests
        by_adapter.setdefault(adapter, []).append(image)
    for images in by_adapter.values():
        assert all(np.array_equal(images[0], im) for im in images)
    firsts = [images[0] for images in by_adapter.values()]
    assert all(not np.array_equal(x, y) for i, x in enumerate(firsts) for y in firsts[i + 1 :])
    assert server["process"].poll() is None


def test_in_a_real_browser(server, world):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server["url"])
        page.wait_for_selector("#generate", timeout=60_000)
        page.click("#adapters input")
        options = page.locator("ul[role=listbox] li")
        labels = [options.nth(i).inner_text() for i in range(options.count())]
        assert any(label.startswith("run_a/moslora_adapter.safetensors — native, rank 4") for label in labels)
        assert not any("broken" in label for label in labels)  # listed below the picker as unreadable instead
        options.filter(has_text="run_a/moslora_adapter.safetensors").first.click()
        page.keyboard.press("Escape")
        page.wait_for_function("document.querySelector('#prompt textarea').value.length > 0")
        assert page.locator("#prompt textarea").input_value() == "a photo of sks thing1"  # pre-filled
        page.wait_for_function("document.querySelector('#details').innerText.includes('loads in')")
        assert "native file, loads in dreambooth-moslora only" in page.locator("#details").inner_text()
        page.wait_for_selector("a[download]", timeout=30_000)  # the file, offered for download
        assert page.locator("a[download]").first.get_attribute("download") == "moslora_adapter.safetensors"
        page.locator("#prompt textarea").fill("a photo of sks thing1 on a green background")
        page.click("#compare input")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2", timeout=120_000)
        assert "image(s) from" in page.locator("#status").inner_text()
        assert "broken_lora.safetensors" in page.content()
        shot = world["root"] / "webui.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    keep = os.environ.get("WEBUI_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    assert Image.open(shot).size[0] == 1400


def test_uploads_are_capped_and_hostile_requests_leave_the_server_serving(server):
    import httpx
    from gradio_client import Client

    big = httpx.post(server["url"] + "gradio_api/upload",
                     files={"files": ("big.png", b"\0" * (11 * 2**20), "image/png")}, timeout=60)
    assert big.status_code == 413, big.text[:200]
    client = Client(server["url"], verbose=False)
    small = dict(steps=3, width=64, height=64, api_name="/generate")
    with pytest.raises(Exception, match="seed"):
        client.predict("a photo", seed=2**70, **small)
    with pytest.raises(Exception, match="not one this server offers"):
        client.predict("a photo", base_model="../outside/model", **small)
    result = client.predict("a photo", seed=1, **small)
    assert len(result["images"]) == 1 and result["seeds"] == [1] and server["process"].poll() is None
    assert "Traceback" not in server["log"].read_text()
