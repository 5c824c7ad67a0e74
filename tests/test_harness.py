"""The comparison harness: paired bootstrap intervals over seeds and items, and what counts as a win."""

from __future__ import annotations

import numpy as np
import pytest

from layerif.commands.compare import Metric, group, outcome, paired_bootstrap, paired_section


def test_paired_bootstrap_equals_a_plain_loop():
    diff = np.random.default_rng(3).normal(0.1, 1.0, size=(3, 20))
    mean, lo, hi = paired_bootstrap(diff, B=300, seed=7)
    rng = np.random.default_rng(7)  # the same draws, summed one cell at a time
    seeds, items = rng.integers(0, 3, size=(300, 3)), rng.integers(0, 20, size=(300, 20))
    means = []
    for b in range(300):
        total = 0.0
        for s in seeds[b]:
            for i in items[b]:
                total += diff[s, i]
        means.append(total / (3 * 20))
    assert mean == pytest.approx(diff.mean())
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert paired_bootstrap(np.full((2, 5), 0.25), B=50) == pytest.approx((0.25, 0.25, 0.25))


@pytest.mark.parametrize("lo, hi, higher, expect", [
    (0.1, 0.3, True, "win"), (-0.3, -0.1, True, "loss"), (-0.1, 0.2, True, "level"),
    (-0.3, -0.1, False, "win"), (0.1, 0.3, False, "loss"), (0.0, 0.2, False, "level"),
])
def test_a_win_needs_the_interval_on_the_good_side(lo, hi, higher, expect):
    assert outcome(lo, hi, higher) == expect


def test_paired_section_against_uniform_and_the_best_baseline():
    """layerif is right on every item where uniform is wrong: a win; against owl (the best baseline) it is level."""
    rng = np.random.default_rng(0)
    base = (rng.random((3, 40)) < 0.5).astype(float)
    arms = {"uniform": base, "owl": np.maximum(base, (rng.random((3, 40)) < 0.5)),
            "layerif": np.maximum(base, (rng.random((3, 40)) < 0.5))}
    rows = [{"allocation": a, "seed": str(s), "accuracy": float(x[s].mean()), "items": {"correct": list(x[s])}}
            for a, x in arms.items() for s in range(3)]
    lines = paired_section(group(rows, lambda r: "all"), [Metric("accuracy", True, 3, "accuracy")],
                           {"accuracy": "correct"}, baselines=["uniform", "owl"], subjects=["layerif"],
                           label=lambda k: k)
    vs = {line.split(" | ")[3]: line for line in lines if line.startswith("| all |")}
    assert vs["uniform"].endswith("| win |")
    delta = float(vs["uniform"].split(" | ")[4])
    assert delta == pytest.approx((arms["layerif"] - arms["uniform"]).mean(), abs=1e-4)
    assert "owl (best baseline)" in vs and vs["owl (best baseline)"].endswith("| level |")


def test_a_comparison_that_cannot_be_made_is_listed_with_its_reason():
    """The reference lacks one of the allocation's seeds: the pair is listed as not made, never dropped silently."""
    rng = np.random.default_rng(1)
    rows = [{"allocation": a, "seed": str(s), "accuracy": 0.5, "items": {"correct": list(rng.random(10) < 0.5)}}
            for a, seeds in (("uniform", (0, 1)), ("layerif", (0, 1, 2))) for s in seeds]
    lines = paired_section(group(rows, lambda r: "all"), [Metric("accuracy", True, 3, "accuracy")],
                           {"accuracy": "correct"}, baselines=["uniform"], subjects=["layerif"], label=lambda k: k)
    assert "1 paired comparison could not be made:" in lines
    assert "- all, accuracy: layerif against uniform: the reference has no run with seed 2" in lines
    assert "Of 0 paired comparisons: 0 wins, 0 losses, 0 level (interval includes 0)." in lines
