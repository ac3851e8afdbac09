"""The GPU suite's summary (the figures the GPU issue names) from its runs' results, and the side-by-side ratios."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gpu_suite import card_peak, summary  # noqa: E402
from vs_diffusers import summarise  # noqa: E402


def test_the_summary_holds_the_issues_figures():
    results = {
        "diffusers": {"steps_per_second": 1.6, "peak_bytes": 14 * 2**30},
        "ours": {"steps_per_second": 3.2, "images_per_second": 3.2},
        "bs1": {"steps_per_second": 4.0, "images_per_second": 4.0},
        "bs1 ckpt": {"steps_per_second": 2.5, "images_per_second": 2.5},
        "low memory": {"steps_per_second": 2.0, "images_per_second": 2.0, "peak_bytes": 7 * 2**30},
        "batch 8": {"steps_per_second": 2.75, "images_per_second": 22.0},
        "mixer none": {"steps_per_second": 4.2},
        "mixer none 2": {"steps_per_second": 4.0},
        "mixer learned 2": {"steps_per_second": 4.2},
        "compiled": {"error": "skipped: 0 s of the time budget left"},
    }
    s = summary(results, "NVIDIA H200")
    assert s["vs_diffusers"] == pytest.approx(2.0)  # ours at the table's settings ÷ diffusers'
    assert (s["bs1_steps_per_second"], s["bs1_ckpt_steps_per_second"]) == (4.0, 2.5)
    assert (s["best_images_per_second"], s["best_run"]) == (22.0, "batch 8")
    assert s["best_mfu"] == pytest.approx(22.0 * 13.5 / 989.4) and s["dense_bf16_tflops"] == 989.4
    assert s["low_memory_peak_gib"] == pytest.approx(7.0)
    # time per step, learned over none: none's pooled 4.1 steps/s over learned's 4.1
    assert s["mixer_time_ratio"] == pytest.approx(4.1 / 4.1)
    assert card_peak("NVIDIA H100 80GB HBM3") == 989.4 and card_peak("CPU") is None
    assert summary({"diffusers": {"error": "x"}, "bs1": {"error": "y"}}, "CPU")["vs_diffusers"] is None


def test_side_by_side_ratios_pair_each_run_with_diffusers_run_of_its_round():
    runs = {"ours": [{"steps_per_second": 12.0}, {"steps_per_second": 11.0}],
            "ours --cache_latents": [{"steps_per_second": 15.0}, {"error": "failed"}],
            "diffusers": [{"steps_per_second": 10.0}, {"steps_per_second": 10.0}]}
    s = summarise(runs)
    assert s["ours"]["ratio_median"] == pytest.approx(1.15) and s["ours"]["ratio_range"] == [1.1, 1.2]
    assert s["ours --cache_latents"]["ratio_median"] == pytest.approx(1.5)  # the failed pair is left out
