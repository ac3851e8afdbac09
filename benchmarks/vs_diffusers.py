"""train_dreambooth.py against diffusers' train_dreambooth_lora_sdxl.py on the same job, each run its own process.

    python benchmarks/vs_diffusers.py                      # the tiny SDXL on the CPU: 64 px, prior preservation
    python benchmarks/vs_diffusers.py --model DIR --resolution 1024 --mixed_precision bf16 --no-prior  # a GPU

Both scripts are timed the same way, from outside: a global optimizer-step hook (after a synchronize on a GPU) stamps
the end of every optimizer step, and the speed is steps/s over the steps after the first two; the peak is
torch.cuda.max_memory_allocated (RSS on a CPU). Runs alternate (ours, theirs, theirs, ours, …) so drift in the
machine hits both; the ratio is ours ÷ theirs per pair, with the median and range over pairs. Both run with their
own defaults but the shared settings (resolution, batch 1, rank 4, lr 1e-4, precision, prior preservation, the same
class images); ours is also run with --cache_latents, which diffusers' script does not have, and with
--torch_compile besides (its compilation, minutes on a small CPU, falls in the first step, which is not timed).

diffusers' script is read from ../shared/reference/ (Apache-2.0, run as it is, never copied); it needs torchvision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # toyworld, where this project is not installed into the environment that runs it
OURS = ("ours", "ours --cache_latents", "ours --cache_latents --torch_compile")
REFERENCE = ROOT.parent / "shared" / "reference" / "train_dreambooth_lora_sdxl.py"

# Runs a training script in this process with every optimizer step timed; prints one RESULT line.
RUNNER = """
import json, resource, runpy, sys, time, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps = []
def stamp(optimizer, args, kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
register_optimizer_step_post_hook(stamp)
script, argv = sys.argv[1], json.loads(sys.argv[2])
sys.argv = [script, *argv]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as stop:
    if stop.code not in (0, None):
        raise
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT", json.dumps({"stamps": stamps, "peak_bytes": peak, "rss_bytes": rss}))
"""


def shared_argv(a, subject: Path, class_dir: Path, out: Path) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(a.model), "--instance_data_dir", str(subject),
            "--instance_prompt", "a sks circle", "--resolution", str(a.resolution), "--train_batch_size", "1",
            "--max_train_steps", str(a.steps), "--learning_rate", "1e-4", "--rank", "4", "--seed", "0",
            "--output_dir", str(out), "--checkpointing_steps", str(10**6)]
    if a.mixed_precision != "no":
        argv += ["--mixed_precision", a.mixed_precision]
    if a.prior:
        argv += ["--with_prior_preservation", "--class_prompt", "a circle", "--class_data_dir", str(class_dir),
                 "--num_class_images", str(a.num_class_images)]
    if a.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    return argv


def run(script: Path, argv: list[str], timeout: float, skip: int = 2) -> dict:
    """Runs a training script in its own process; steps/s over the optimizer steps after the first ``skip``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep carried packages
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    try:
        done = subprocess.run([sys.executable, "-c", RUNNER, str(script), json.dumps(argv)], capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr).strip().splitlines()
        return {"error": (tail[-1] if tail else f"exit code {done.returncode}")[:300]}
    result = json.loads(lines[-1][len("RESULT "):])
    stamps = result.pop("stamps")
    timed = stamps[skip:] if len(stamps) > skip + 1 else stamps
    result["steps"] = len(stamps)
    result["steps_per_second"] = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None
    steps = [b - a for a, b in zip(timed, timed[1:])]
    result["median_step_ms"] = round(statistics.median(steps) * 1e3, 2) if steps else None
    return result


def make_class_images(a, subject: Path, class_dir: Path) -> None:
    """The class images both scripts train on, drawn once by our trainer (a one-step run)."""
    if not a.prior:
        return
    out = Path(tempfile.mkdtemp(prefix="warm-"))
    argv = shared_argv(a, subject, class_dir, out) + ["--max_train_steps", "1", "--class_inference_steps", "10",
                                                      "--output_formats", "native", "--report_to", "none"]
    result = run(ROOT / "train_dreambooth.py", argv, timeout=a.timeout)
    if "error" in result:
        raise SystemExit(f"drawing the class images failed: {result['error']}")


def compare(a) -> dict:
    from toyworld.world import write_subject

    work = Path(tempfile.mkdtemp(prefix="vs-diffusers-"))
    subject, class_dir = work / "subject", work / "class"
    write_subject(subject, count=4, size=a.resolution)
    for caption in subject.glob("*.txt"):  # diffusers' script takes the instance prompt; so does ours here
        caption.unlink()
    make_class_images(a, subject, class_dir)
    runs = {"ours": (ROOT / "train_dreambooth.py", ["--report_to", "none", "--output_formats", "diffusers"]),
            "ours --cache_latents": (ROOT / "train_dreambooth.py",
                                     ["--report_to", "none", "--output_formats", "diffusers", "--cache_latents"]),
            "ours --cache_latents --torch_compile": (ROOT / "train_dreambooth.py", [
                "--report_to", "none", "--output_formats", "diffusers", "--cache_latents", "--torch_compile"]),
            "diffusers": (a.reference, ["--report_to", "tensorboard"])}
    if not a.compiled:
        del runs[OURS[2]]
    results: dict[str, list] = {name: [] for name in runs}
    order = [name for pair in range(a.pairs) for name in (list(runs) if pair % 2 == 0 else list(runs)[::-1])]
    for i, name in enumerate(order):
        script, extra = runs[name]
        result = run(script, shared_argv(a, subject, class_dir, work / f"run{i}") + extra, a.timeout)
        print(f"  {name}: {result}", flush=True)
        results[name].append(result)
    return summarise(results)


def summarise(results: dict[str, list]) -> dict:
    theirs = [r.get("steps_per_second") for r in results["diffusers"]]
    summary = {"runs": results}
    for name in (n for n in OURS if n in results):
        ratios = [o.get("steps_per_second") / t for o, t in zip(results[name], theirs)
                  if o.get("steps_per_second") and t]
        summary[name] = {"ratio_median": statistics.median(ratios) if ratios else None,
                         "ratio_range": [min(ratios), max(ratios)] if ratios else None,
                         "steps_per_second": [r.get("steps_per_second") for r in results[name]],
                         "median_step_ms": [r.get("median_step_ms") for r in results[name]]}
    summary["diffusers"] = {"steps_per_second": theirs,
                            "median_step_ms": [r.get("median_step_ms") for r in results["diffusers"]]}
    return summary


def options(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a diffusers SDXL folder (default: the tiny SDXL, built here)")
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pairs", type=int, default=2, help="alternating rounds of the three runs")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--num_class_images", type=int, default=8)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True, help="also run ours compiled")
    p.add_argument("--timeout", type=float, default=900, help="seconds for one run")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = options(argv)
    if not a.reference.is_file():
        raise SystemExit(f"diffusers' script is not at {a.reference}")
    if a.model is None:
        from toyworld.tiny_sdxl import save_tiny_sdxl

        a.model = save_tiny_sdxl(Path(tempfile.mkdtemp(prefix="tiny-sdxl-")) / "model", seed=0)
    started = time.perf_counter()
    summary = compare(a)
    summary["settings"] = {k: str(v) for k, v in vars(a).items()}
    summary["seconds"] = time.perf_counter() - started
    for name in (n for n in OURS if n in summary):
        s = summary[name]
        if s["ratio_median"] is not None:
            print(f"{name} ÷ diffusers, steps/s: {s['ratio_median']:.2f}× "
                  f"(range {s['ratio_range'][0]:.2f}–{s['ratio_range'][1]:.2f} over "
                  f"{len(s['steps_per_second'])} pair(s))")
        else:
            print(f"{name} ÷ diffusers: no ratio (a run failed; see above)")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
