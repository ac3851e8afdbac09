"""The class-variety measure: total-variation distance between what the base model and the adapter draw."""

import pytest

from toyworld.recipe import class_variety, total_variation


def reads(colours: str) -> list[dict]:
    return [{"shape": "circle", "colour": c, "background": "gray"} for c in colours.split()]


def test_total_variation_of_label_samples():
    assert total_variation(list("aabb"), list("abab")) == 0.0  # the same distribution, in another order
    assert total_variation(list("aaaa"), list("bbbb")) == 1.0
    assert total_variation(list("aabb"), list("aaab")) == pytest.approx(0.25)
    assert total_variation(list("ab"), list("aabb")) == 0.0  # sizes may differ: distributions are compared


def test_class_variety_reads_shape_and_colour_per_background_and_bounds_it():
    base = {"gray": reads("red green blue yellow " * 6), "blue": reads("red green white yellow " * 6)}
    same = class_variety(base, base, reps=200)
    assert same["tv"] == 0.0 and same["tv_interval"] == (0.0, 0.0)
    collapsed = {"gray": reads("green " * 24), "blue": reads("red green white yellow " * 6)}
    result = class_variety(base, collapsed, reps=500)
    assert result["per_background"] == {"gray": pytest.approx(0.75), "blue": 0.0}
    assert result["tv"] == pytest.approx(0.375)
    low, high = result["tv_interval"]
    assert 0.25 < low <= result["tv"] <= high < 0.5  # seeds resampled in pairs: the interval holds the estimate
    assert result["colours"]["gray"][1] == {"green": 24}
    squares = {"gray": [{**r, "shape": "square"} for r in base["gray"]], "blue": base["blue"]}
    assert class_variety(base, squares, reps=10)["per_background"]["gray"] == 1.0  # the shape counts too
