"""Budget verdicts: checked or not, fits or not (at the boundary too), the line a person reads, the plain dict."""

import pytest

from budget_callback.forecast.budgets import POLICIES, Verdict


@pytest.mark.parametrize("projected, budget, checked, fits", [
    (5, None, False, True),  # no budget: never blocks
    (0, None, False, True),
    (10**15, None, False, True),
    (5, 5, True, True),  # exactly the budget fits
    (4, 5, True, True),
    (6, 5, True, False),  # one byte over does not
    (0, 0, True, True),
    (1, 0, True, False),
])
def test_checked_and_fits(projected, budget, checked, fits):
    v = Verdict("disk", projected, budget)
    assert (v.checked, v.fits) == (checked, fits)
    assert v.to_dict() == {"name": "disk", "projected_bytes": projected, "budget_bytes": budget, "advice": [],
                           "fits": fits, "known": True, "basis": ""}


@pytest.mark.parametrize("projected, budget, advice, expected", [
    (1536, None, ["x"], "memory: 1.50 KiB projected, no budget set"),
    (1024, 2048, ["not shown when it fits"], "memory: 1.00 KiB projected of 2.00 KiB budget: fits"),
    (3 * 2**30, 2**30, [], "memory: 3.00 GiB projected of 1.00 GiB budget: DOES NOT FIT"),
    (3 * 2**30, 2**30, ["raise a", "or b"],
     "memory: 3.00 GiB projected of 1.00 GiB budget: DOES NOT FIT (raise a; or b)"),
])
def test_line_says_both_sizes_the_verdict_and_advice_only_when_over(projected, budget, advice, expected):
    assert Verdict("memory", projected, budget, advice).line() == expected


def test_policies_are_the_three_documented_ones():
    # README "Budgets": downsample raises the interval, abort raises before the first step, warn goes on
    assert POLICIES == ("downsample", "abort", "warn")


def test_an_unknown_projection_never_fits_a_budget_and_says_so():
    from budget_callback.forecast.budgets import decide

    unknown = Verdict("memory", 1000, 2000, known=False, basis="the step could not be traced (X)")
    assert not unknown.fits and not unknown.exceeds
    assert unknown.line() == ("memory: UNKNOWN, at least 1000 B (model states only) of 1.95 KiB budget "
                              "[the step could not be traced (X)]")
    assert Verdict("memory", 1000, None, known=False).fits  # no budget: nothing to vouch for
    fits = {"disk": Verdict("disk", 1, 2)}
    assert decide({**fits, "memory": unknown}, "downsample", False) == "unknown"
    assert decide({**fits, "memory": unknown}, "warn", True) == "unknown"
    assert decide({**fits, "memory": unknown}, "abort", False) == "abort"
    over = Verdict("disk", 3, 2)
    assert decide({"disk": over, "memory": unknown}, "warn", False) == "warn"
    assert decide(fits, "downsample", True) == "downsampled" and decide(fits, "abort", False) == "fits"
