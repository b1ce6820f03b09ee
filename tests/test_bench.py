"""The benchmark suite: `python -m bench --tiny` runs every section and writes finite figures, and
the shared timing helper measures what it says (bench/common.py)."""
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.common import Context, Table, Timing, measure, speedup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _tables(report, section):
    entry = report["sections"][section]
    assert entry["ok"], entry
    return {t["title"].split(":")[0]: t for t in entry["tables"]}


def _rows(table, key="implementation"):
    i = table["columns"].index(key) if key in table["columns"] else 0
    return {row[i]: dict(zip(table["columns"], row)) for row in table["rows"]}


def _assert_finite(row, columns):
    for c in columns:
        assert isinstance(row[c], (int, float)) and math.isfinite(row[c]) and row[c] > 0, (c, row)


def test_every_section_runs_and_is_stamped(tiny_report):
    from bench.__main__ import SECTIONS

    report, stdout = tiny_report
    assert list(report["sections"]) == SECTIONS
    meta = report["meta"]
    for key in ("device", "torch", "triton", "commit", "date"):
        assert meta[key], key
    assert meta["mode"] == "tiny"
    for key in ("matmul TFLOP/s", "memory GB/s"):
        assert math.isfinite(report["ceilings"][key]) and report["ceilings"][key] > 0
    assert "FAILED" not in stdout


def test_gpu_sections_say_skipped_on_cpu(tiny_report):
    report, _ = tiny_report
    for section in ("attention", "rope"):
        (table,) = report["sections"][section]["tables"]
        assert table["rows"] == [["skipped (no CUDA)"]]
    tables = _tables(report, "cross_entropy")
    assert tables["Cross-entropy alone"]["rows"] == [["skipped (no CUDA)"]]


def test_linear_cross_entropy_cpu_rows(tiny_report):
    report, _ = tiny_report
    table = _tables(report, "cross_entropy")["Linear cross-entropy"]
    passes = {(row[1], row[2]) for row in table["rows"]}
    for p in ("forward", "backward", "forward+backward"):
        assert (p, "fasttrain") in passes and (p, "unfused eager") in passes
    for row in table["rows"]:
        r = dict(zip(table["columns"], row))
        if r["pass"] and not str(r["ms"]).startswith("failed"):
            _assert_finite(r, ["ms", "TFLOP/s"])
            if r["implementation"] == "fasttrain":
                assert r["fasttrain speed-up"] == 1.0


def test_data_path_rows(tiny_report):
    report, _ = tiny_report
    speed = _rows(_tables(report, "packing")["Packing speed"], "packer")
    assert any(name.startswith("fasttrain") for name in speed) and "reference (plain Python)" in speed
    for row in speed.values():
        _assert_finite(row, ["M tokens/s", "GB/s"])
    quality = _rows(_tables(report, "packing")["Packing quality"], "packer")
    assert {"concat+chop", "best-fit+crop (nanochat)", "first-fit decreasing"} <= set(quality)

    training = _rows(_tables(report, "tokenizer")["BPE training"], "trainer")
    assert set(training) == {"fasttrain", "rustbpe", "hf tokenizers"}
    _assert_finite(training["fasttrain"], ["train s", "MB/s", "bytes/token"])
    for name in ("rustbpe", "hf tokenizers"):  # measured, or a 'not installed' row
        assert training[name]["train s"] == "not installed" or math.isfinite(training[name]["train s"])
    encoding = _rows(_tables(report, "tokenizer")["Encoding"], "encoder")
    _assert_finite(encoding["fasttrain (tiktoken inside)"], ["ms", "MB/s", "M tokens/s"])

    loader = _tables(report, "loader")
    alone = next(t for k, t in loader.items() if k.startswith("Loader alone"))
    assert len(alone["rows"]) == 2  # a small and a large corpus
    for row in _rows(alone, "corpus").values():
        _assert_finite(row, ["M tokens/s", "ms/step"])
    step = next(t for k, t in loader.items() if k.startswith("Loader + a step"))
    for row in _rows(step, "loop").values():
        _assert_finite(row, ["k tokens/s"])

    decode = _rows(_tables(report, "decode")["Decode"], "engine")
    _assert_finite(decode["fasttrain KV cache"], ["prefill ms", "decode tokens/s"])
    _assert_finite(decode["recompute (no cache)"], ["prefill ms", "decode tokens/s"])

    (data,) = report["sections"]["data"]["tables"]
    _assert_finite(dict(zip(data["columns"], data["rows"][0])), ["MB/s", "tokens"])


def test_train_step_rows(tiny_report):
    """The end-to-end table: fasttrain and the plain PyTorch path both ran a step (a failed
    variant is a 'failed: ...' cell, not a number), with a ratio against plain and peak memory."""
    report, _ = tiny_report
    entry = report["sections"]["train_step"]
    assert entry["ok"], entry
    table = next(t for t in entry["tables"] if t["title"].startswith("End to end: training step"))
    steps = _rows(table, "variant")
    assert set(steps) == {"fasttrain", "plain PyTorch"}  # --tiny leaves out the compiled variants
    for row in steps.values():
        _assert_finite(row, ["tokens/s", "step ms", "vs plain", "peak memory MB"])
    assert steps["plain PyTorch"]["vs plain"] == 1.0


def test_compile_report_rows(tiny_report):
    report, _ = tiny_report
    (table,) = report["sections"]["compile_report"]["tables"]
    assert table["rows"], "no kernel went through ptxas"
    for row in table["rows"]:
        r = dict(zip(table["columns"], row))
        assert r["target"] == "sm_90" and r["result"] == "ok", r
        assert isinstance(r["registers"], int) and 0 < r["registers"] <= 255


# ---- the timing helper, against independent computations


def test_measure_alternates_and_reverses_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    measure(fns, Context(), reps=4, warmup=1, budget_s=100)
    warmup, timed = calls[:3], calls[3:]
    assert warmup == ["a", "b", "c"]
    assert timed == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]


def test_measure_times_and_percentiles():
    delays = {"short": 0.005, "long": 0.05}  # a loaded machine oversleeps by milliseconds
    fns = {name: (lambda d=d: time.sleep(d)) for name, d in delays.items()}
    t = measure(fns, Context(), reps=5, budget_s=100)
    for name, d in delays.items():
        assert t[name].n == 5
        assert d <= t[name].median < d + 0.1
        assert t[name].p20 <= t[name].median <= t[name].p80
    assert 2 < speedup(t["long"], t["short"]) < 11


def test_timing_of_matches_statistics():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0, 10.0, 11.0]
    t = Timing.of(xs)
    assert t.median == statistics.median(xs)
    cuts = statistics.quantiles(xs, n=5, method="inclusive")  # 20th, 40th, 60th, 80th percentiles
    assert t.p20 == cuts[0] and t.p80 == cuts[3]


def test_measure_reports_a_failing_callable_and_keeps_the_rest():
    def broken():
        raise ValueError("no such kernel")
    t = measure({"ok": lambda: None, "broken": broken}, Context(), reps=3, budget_s=100)
    assert isinstance(t["ok"], Timing) and t["ok"].n == 3
    assert t["broken"] == "failed: ValueError: no such kernel"


def test_measure_setup_is_untimed_and_feeds_the_call():
    seen = []
    t = measure({"x": seen.append}, Context(), reps=3, budget_s=100, setup={"x": lambda: time.sleep(0.05) or 7})
    assert seen == [7, 7, 7, 7]  # warm-up + 3 timed
    assert t["x"].median < 0.01


def test_table_rejects_a_row_of_the_wrong_width():
    table = Table("t", ["a", "b"])
    with pytest.raises(ValueError, match="2 columns"):
        table.add(1, 2, 3)


def test_plots_are_written_or_skipped_with_a_note(tmp_path):
    from bench.common import optional, plot_bars, plot_lines

    series = {"fasttrain": [(1024, 100.0), (4096, 300.0)], "sdpa": [(1024, 120.0), (4096, 250.0)]}
    assert "not written" in plot_lines(Context(out=None), "a.png", "t", "T", "TFLOP/s", series)
    note = plot_bars(Context(out=str(tmp_path)), "b.png", "t", "tokens/s", {"eager": 1.0, "compiled": 2.0})
    if optional("matplotlib") is None:
        assert note == "plot skipped (matplotlib not installed)"
    else:
        assert note == f"plot: {tmp_path / 'b.png'}" and (tmp_path / "b.png").stat().st_size > 1000
