"""The web demo's API as a contract: the real server, driven with gradio_client only (no browser), as docs/web-demo.md
documents it — the endpoint table, the script shown there (run as it is), refusals as one line, no traceback."""

import filecmp
import inspect
import re
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import webui_server
from webui.api import ENDPOINTS, Api

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = sorted((ROOT / "assets" / "subject").glob("*.png"))
DOC = ROOT / "docs" / "web-demo.md"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    adapters = root / "adapters"
    adapters.mkdir()
    log = root / "server.log"
    flags = ("--adapters", str(adapters), "--demo", "--output_dir", str(root / "images"))
    with webui_server(log, *flags) as (url, _, process):
        yield {"url": url, "root": root, "adapters": adapters, "log": log, "process": process}


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def documented_endpoints() -> dict[str, list[str]]:
    """The endpoint table of docs/web-demo.md: name → parameter names, as the table gives them."""
    rows = re.findall(r"^\| `/(\w+)` \| ([^|]*) \|", DOC.read_text(), flags=re.M)
    return {name: re.findall(r"`(\w+)`", params) for name, params in rows}


def test_view_api_shows_the_documented_endpoints_and_nothing_else(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert info["unnamed_endpoints"] == {}
    served = {name.lstrip("/"): [p["parameter_name"] for p in e["parameters"]]
              for name, e in info["named_endpoints"].items()}
    assert sorted(served) == sorted(ENDPOINTS)
    for name, parameters in served.items():  # each one's parameters are its function's, in order
        assert parameters == list(inspect.signature(getattr(Api, name)).parameters)[1:], name
    assert documented_endpoints() == served  # the page users read says the same
    required = {name: [p["parameter_name"] for p in e["parameters"] if not p["parameter_has_default"]]
                for name, e in info["named_endpoints"].items()}
    assert required == {"/adapters": [], "/generate": ["prompt"], "/compare": ["prompt"], "/download": ["adapter"],
                        "/train": [], "/train_status": [], "/train_stop": [], "/train_resume": ["run_id"]}


def test_the_documented_script_trains_then_generates_with_the_new_adapter(server, client, capsys):
    """docs/api_example.py as it is, against a server started before the adapter existed (no refresh anywhere)."""
    assert client.predict(api_name="/adapters") == [] and client.predict(api_name="/train_status")["state"] == "idle"
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from api_example import train_and_generate
    finally:
        sys.path.remove(str(ROOT / "docs"))
    result = train_and_generate(server["url"], [str(p) for p in SUBJECT], max_train_steps=60)
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(r"running .* of 60 [1-9] sample", line) for line in lines)  # a sample while it ran
    status, run = result["status"], result["run"]
    assert status["state"] == "done" and status["step"] == 60 and status["adapter_id"] == run["adapter_id"]
    assert [s["step"] for s in status["samples"]] == [50, None]  # validation_steps 50, then the final grid
    for sample in status["samples"]:  # files the client could download: PNGs of the run's grids
        assert Image.open(sample["image"]).format == "PNG"
    assert filecmp.cmp(result["file"], server["adapters"] / run["adapter_id"], shallow=False)
    images = result["images"]
    assert len(images["images"]) == 2 and images["seeds"] == [0, 1] and images["warnings"] == []
    assert all(Image.open(p).size == (32, 32) for p in images["images"])  # the demo server's size
    compare = result["compare"]
    assert compare["labels"] == ["base model · seed 0", f"{run['adapter_id'].removesuffix('.safetensors')} · seed 0"]
    same_seed = Image.open(images["images"][0]).tobytes(), Image.open(compare["images"][1]).tobytes()
    assert same_seed[0] == same_seed[1]  # the adapter's image from seed 0, by either endpoint
    listed = {a["id"]: a for a in client.predict(api_name="/adapters")}
    entry = listed[run["adapter_id"]]
    assert entry["format"] == "native" and entry["rank"] == 4 and entry["instance_prompt"] == "a sks circle"


def wait_for(client, run_id, condition, timeout=300) -> dict:
    deadline = time.time() + timeout
    while not condition(status := client.predict(run_id, api_name="/train_status")):
        assert time.time() < deadline, status
        time.sleep(0.5)
    return status


def test_stop_and_resume_a_run(server, client):
    from gradio_client import handle_file

    photos = dict(images=[handle_file(str(p)) for p in SUBJECT], instance_prompt="a sks circle",
                  class_prompt="a circle")
    run = client.predict(**photos, max_train_steps=400, validation_steps=1000, api_name="/train")
    with pytest.raises(Exception, match="already in progress"):  # one run at a time
        client.predict(**photos, api_name="/train")
    wait_for(client, run["run_id"], lambda s: s["step"] >= 1 or s["state"] not in ("starting", "running"))
    assert client.predict(api_name="/train_stop") == {"run_id": run["run_id"], "state": "stopping"}
    stopped = wait_for(client, run["run_id"], lambda s: s["state"] in ("stopped", "failed"))
    assert stopped["state"] == "stopped" and stopped["resumable"] and stopped["adapter_id"] is None, stopped["error"]
    assert client.predict(run["run_id"], api_name="/train_resume")["run_id"] == run["run_id"]
    resumed = wait_for(client, run["run_id"], lambda s: s["step"] > stopped["step"] or s["state"] != "running")
    assert resumed["state"] == "running", resumed["error"]
    client.predict(api_name="/train_stop")
    assert wait_for(client, run["run_id"], lambda s: s["state"] in ("stopped", "failed"))["state"] == "stopped"


@pytest.mark.parametrize("call, message", [
    (dict(prompt="a circle", steps=0, api_name="/generate"), "steps must be between 1 and 150"),
    (dict(prompt="a circle", adapters=["../x.safetensors"], api_name="/generate"), "no adapter '../x.safetensors'"),
    (dict(prompt="a circle", scheduler="Magic", api_name="/compare"), "unknown scheduler 'Magic'"),
    (dict(prompt=" ", api_name="/generate"), "the prompt is empty"),
    (dict(adapter="nothing.safetensors", api_name="/download"), "no adapter 'nothing.safetensors'"),
    (dict(instance_prompt="a sks circle", class_prompt="a circle", preset="fast", api_name="/train"), "unknown preset"),
    (dict(images=[{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}] * 3, instance_prompt="a sks circle",
          class_prompt="a circle", api_name="/train"), "hostname: not an image file"),  # uploaded by the client: a file
    (dict(images=[{"path": "/etc/hostname"}], instance_prompt="a sks circle", class_prompt="a circle",
          api_name="/train"), "files uploaded with the request"),
    (dict(run_id="../etc", api_name="/train_resume"), "no run named"),
    (dict(run_id="2020-01-01-000000-sks", api_name="/train_status"), "no run '2020-01-01-000000-sks'"),
])
def test_a_bad_value_is_one_line_and_no_traceback(server, client, call, message):
    with pytest.raises(Exception, match=re.escape(message)) as refusal:
        client.predict(**call)
    assert "\n" not in str(refusal.value).strip()
    assert server["process"].poll() is None and "Traceback" not in server["log"].read_text()


def test_the_docs_show_the_tested_script_as_it_is():
    assert f"```python\n{(ROOT / 'docs' / 'api_example.py').read_text()}```" in DOC.read_text()
