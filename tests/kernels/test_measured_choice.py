import time

from vllm_quamba.kernels import measured_choice
from vllm_quamba.kernels.measured_choice import row_bucket, run_fastest


def test_row_bucket_is_the_next_power_of_two_up_to_the_measured_rows():
    assert [row_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 128)] == [1, 2, 4, 4, 8, 16, 32, 128]
    assert row_bucket(measured_choice.MEASURED_ROWS + 1) == row_bucket(8192) == measured_choice.MEASURED_ROWS


def test_the_fastest_candidate_is_chosen_once_and_kept():
    """A candidate 20 ms slower than the other loses even on a loaded machine (each is timed as
    the minimum of several calls); after the first call only the chosen candidate runs."""
    calls = {"slow": 0, "fast": 0}

    def candidate(name, delay):
        def call():
            calls[name] += 1
            time.sleep(delay)
            return name
        return call

    key = ("test", object())
    candidates = {"slow": candidate("slow", 0.02), "fast": candidate("fast", 0.0)}
    assert run_fastest(key, candidates) == "fast"
    assert measured_choice.chosen()[key] == "fast"
    slow_calls = calls["slow"]
    assert [run_fastest(key, candidates) for _ in range(3)] == ["fast"] * 3
    assert calls["slow"] == slow_calls


def test_trials_are_timed_instead_of_the_candidates():
    """Only the trial calls run while choosing; the chosen candidate then runs once."""
    ran = []
    candidates = {"a": lambda: ran.append("a") or "a", "b": lambda: ran.append("b") or "b"}
    trials = {"a": lambda: ran.append("trial a"), "b": lambda: time.sleep(0.02) or ran.append("trial b")}
    assert run_fastest(("test", object()), candidates, lambda: trials) == "a"
    assert ran.count("a") == 1 and "b" not in ran and "trial b" in ran
