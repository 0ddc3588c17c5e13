import time

from vllm_quamba.kernels import measured_choice
from vllm_quamba.kernels.measured_choice import MEASURED_ROWS, row_bucket, run_fastest


def test_row_bucket_is_the_next_power_of_two_up_to_the_measured_rows():
    assert [row_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 128)] == [1, 2, 4, 4, 8, 16, 32, 128]
    assert row_bucket(MEASURED_ROWS + 1) == row_bucket(8192) == MEASURED_ROWS


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

    kind = ("test", object())
    candidates = {"slow": candidate("slow", 0.02), "fast": candidate("fast", 0.0)}
    assert run_fastest(kind, range(3), lambda rows: candidates) == "fast"
    assert measured_choice.chosen()[(kind, row_bucket(3))] == "fast"
    slow_calls = calls["slow"]
    assert [run_fastest(kind, range(4), lambda rows: candidates) for _ in range(3)] == ["fast"] * 3
    assert calls["slow"] == slow_calls


def test_candidates_are_measured_on_the_first_rows_and_run_on_all():
    """Choosing times the candidates on the first MEASURED_ROWS rows only; the chosen one then
    runs once, on every row."""
    ran = []

    def candidates_for(rows):
        def call(name):
            ran.append((name, len(rows)))
            return name, len(rows)
        return {"a": lambda: call("a"), "b": lambda: time.sleep(0.02) or call("b")}

    rows = 3 * MEASURED_ROWS
    assert run_fastest(("test", object()), range(rows), candidates_for) == ("a", rows)
    assert ran[-1] == ("a", rows)
    assert set(ran[:-1]) == {("a", MEASURED_ROWS), ("b", MEASURED_ROWS)}


def test_each_row_class_is_chosen_separately():
    kind = ("test", object())
    run_fastest(kind, range(1), lambda rows: {"only": lambda: None})
    run_fastest(kind, range(MEASURED_ROWS + 1), lambda rows: {"only": lambda: None})
    assert {key for key in measured_choice.chosen() if key[0] == kind} == {(kind, 1), (kind, MEASURED_ROWS)}
