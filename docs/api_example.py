"""Train a subject through the web demo's API, then generate it: the script docs/web-demo.md shows (a test runs it).

    python -m webui --demo                                           # in one terminal (or: make webui)
    python docs/api_example.py http://127.0.0.1:7860/ assets/subject/*.png assets/subject/*.txt
"""

import sys
import time

from gradio_client import Client, handle_file


def train_and_generate(url: str, photos: list[str], max_train_steps: int | None = None) -> dict:
    client = Client(url, verbose=False)
    run = client.predict(images=[handle_file(p) for p in photos], instance_prompt="a sks circle",
                         class_prompt="a circle", max_train_steps=max_train_steps, api_name="/train")
    print("started", run["run_id"])
    while True:  # one status a second: state, phase, step of max_steps, loss, samples so far
        status = client.predict(run["run_id"], api_name="/train_status")
        print(status["state"], status["phase"], status["step"], "of", status["max_steps"], len(status["samples"]),
              "sample(s)")
        if status["state"] not in ("starting", "running", "stopping"):
            break
        time.sleep(1)
    if status["state"] != "done":
        raise SystemExit(f"the run ended {status['state']}: {status['error']}")
    adapters = [a["id"] for a in client.predict(api_name="/adapters")]  # read fresh: the new adapter is there
    assert run["adapter_id"] in adapters
    prompt = "a sks circle on a gray background"
    images = client.predict(prompt, adapters=[run["adapter_id"]], num_images=2, seed=0, api_name="/generate")
    side_by_side = client.predict(prompt, adapters=[run["adapter_id"]], seed=0, api_name="/compare")
    adapter_file = client.predict(run["adapter_id"], api_name="/download")
    print("images:", *images["images"], "compare:", *side_by_side["labels"], "adapter:", adapter_file, sep="\n  ")
    return {"run": run, "status": status, "images": images, "compare": side_by_side, "file": adapter_file}


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    train_and_generate(sys.argv[1], sys.argv[2:])
