"""The benchmark's bookkeeping: which full-size cases run, and how their figures become ratios."""

from esd_core.bench import case_name, full_size_cases, summarize


def result(case: dict, wall_s: float, peak_bytes: int) -> dict:
    """What run_case returns for a case, with made-up figures."""
    return {**case, "wall_s": wall_s, "s_per_update": wall_s / case["config"]["iterations"], "peak_bytes": peak_bytes,
            "peak_above_start_bytes": peak_bytes - 2**30, "device_name": "test"}


def test_full_size_cases_are_the_chosen_methods_and_kinds():
    cases = full_size_cases("sd1", "cpu", "fp32", 64, 2, 4, methods=["esd-u"], kinds=["fast", "checkpointing", "two-unet"])
    assert [case_name(case) for case in cases] == ["esd-u rank 8 fast", "esd-u rank 8 fast +checkpointing", "esd-u two-unet"]
    assert all(case["config"]["iterations"] == 2 and case["config"]["sample_steps"] == 4 for case in cases)
    assert len(full_size_cases("sd1", "cpu", "fp32", 64, 2, 4)) == 8  # by default: both methods, every kind


def test_summary_ratios_are_to_the_same_methods_reference_and_baseline():
    fast, reference, baseline = full_size_cases("sd1", "cpu", "fp32", 64, 10, 4, methods=["esd-x"], kinds=["fast", "reference", "two-unet"])
    rows = summarize([result(fast, 10.0, 3 * 2**30), result(reference, 80.0, 3 * 2**30), result(baseline, 90.0, 5 * 2**30)])
    assert rows[0]["time_vs_reference"] == 0.125 and rows[0]["memory_vs_two_unet"] == 0.6
    assert rows[0]["memory_above_start_vs_two_unet"] == 0.5  # (3 - 1) / (5 - 1) GiB
    assert rows[2]["memory_vs_two_unet"] == 1.0


def test_summary_without_a_reference_case_gives_no_time_ratio():
    (fast,) = full_size_cases("sd1", "cpu", "fp32", 64, 1000, 50, methods=["esd-x"], kinds=["fast"])
    (row,) = summarize([result(fast, 170.0, 3 * 2**30)])
    assert row["s_per_update"] == 0.17 and "time_vs_reference" not in row and "memory_vs_two_unet" not in row
