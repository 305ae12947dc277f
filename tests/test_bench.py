"""The benchmark harness: percentiles, rotation, CSV schema, the run loop, the report, and the CLI on CPU."""
from __future__ import annotations

import argparse
import csv
import math
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fastdensity.benchmarks import harness, measure, record, report, schedule, suite
from fastdensity.benchmarks.bench_masked_conv import live_taps, shifted_masked_conv2d
from fastdensity.benchmarks.bench_masked_linear import made_mask
from fastdensity.benchmarks.harness import CSV_COLUMNS, Case, Provider, Runner, Timing, Unavailable
from fastdensity.commands import bench as bench_cmd
from fastdensity.reference.masked_conv import masked_conv2d, pixelcnn_mask

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------------


def test_csv_columns_are_the_issue_schema():
    assert CSV_COLUMNS == ("op", "provider", "mode", "dtype", "shape", "device", "median_ms", "p20_ms", "p80_ms",
                           "gbps", "bw_fraction", "peak_mem_mb", "saved_mb", "torch", "triton", "commit", "date")


def test_saved_bytes_counts_each_live_saved_storage_once():
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)

    def twice_saved():
        y = x.exp()  # exp saves its output y; y * y saves y twice more: one storage of 4000 bytes
        return (y * y).sum()

    assert measure.saved_bytes(twice_saved, exclude=[x]) == 4000
    # x itself is excluded (it exists anyway), w is not: sin saves x, mul saves sin(x) and w (both want grads).
    assert measure.saved_bytes(lambda: (x.sin() * w).sum(), exclude=[x]) == 8000
    assert measure.saved_bytes(lambda: (x.sin() * w).sum(), exclude=[x, w]) == 4000
    # A graph branch dropped during the call holds nothing once it returns.
    assert measure.saved_bytes(lambda: (x.exp(), x.cos().sum())[1], exclude=[x]) == 0
    # A saved view keeps its whole storage alive: counted whole.
    big = torch.randn(4, 1000)
    assert measure.saved_bytes(lambda: (x * big[0]).sum(), exclude=[x]) == 16000
    with torch.no_grad():
        assert measure.saved_bytes(lambda: x.exp().sum()) == 0


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    values = [rng.uniform(0, 10) for _ in range(n)]
    for q in (0, 20, 50, 80, 100, 33.3):
        assert harness.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-12)
    t = harness.timing_from_samples(values)
    assert (t.median_ms, t.p20_ms, t.p80_ms) == pytest.approx(tuple(np.percentile(values, [50, 20, 80])))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        harness.percentile([], 50)
    with pytest.raises(ValueError, match=r"q must be within \[0, 100\]"):
        harness.percentile([1.0], 101)


def test_rotation_count_exceeds_twice_the_cache():
    cache = 32 * 2**20
    assert harness.rotation_count(cache * 4, cache) == 1  # big inputs: no rotation
    assert harness.rotation_count(cache // 2, cache) == 4  # 4 sets x 16 MiB = 2 x cache
    assert harness.rotation_count(1000, cache) == 64  # tiny inputs: capped (64 x 1 kB)
    n = harness.rotation_count(cache // 3, cache)
    assert n * (cache // 3) >= 2 * cache - 3


def test_zero_inputs_are_refused():
    with pytest.raises(ValueError, match="all zeros"):
        harness.check_inputs((torch.randn(3), torch.zeros(2, 2)), "case")
    harness.check_inputs((torch.randn(3), torch.zeros(2, dtype=torch.long)), "case")  # integer data may be 0


def test_calls_rotate_through_the_input_sets():
    seen = []
    sets = [(torch.full((2,), float(i + 1)),) for i in range(3)]
    call = harness.make_call(Runner(lambda x: seen.append(int(x[0])) or x * 2), sets, "forward")
    for _ in range(5):
        call()
    assert seen == [1, 2, 3, 1, 2]


def test_backward_and_step_calls_return_the_gradients():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    runner = Runner(lambda x, y: (x * y, (x ** 2).sum()))
    backward = harness.make_call(runner, [(a, b)], "backward")
    ga, gb = backward()
    ga2, gb2 = backward()  # the retained graph runs again, same result
    torch.testing.assert_close(ga, ga2)
    torch.testing.assert_close(gb, gb2)
    # The upstream is random for the vector output and 1 for the scalar: recover it from gb = u * a.
    u = gb / a
    torch.testing.assert_close(ga, u * b + 2 * a)
    step = harness.make_call(runner, [(a, b)], "forward+backward")
    ga3, gb3 = step()  # a fresh random upstream for this callable
    torch.testing.assert_close(ga3, gb3 / a * b + 2 * a)
    with pytest.raises(Unavailable, match="nothing requires grad"):
        harness.make_call(Runner(lambda x: x * 2), [(torch.randn(3),)], "backward")


def test_backward_keeps_few_graphs_and_the_step_records_one_up_front():
    forwards = []
    runner = Runner(lambda x: forwards.append(1) or (x * 2).sum())
    sets = [(torch.randn(3, requires_grad=True),) for _ in range(3 * harness.MAX_GRAPHS)]
    backward = harness.make_call(runner, sets, "backward")
    assert len(forwards) == harness.MAX_GRAPHS  # one retained graph per set, at most MAX_GRAPHS of them
    for _ in range(harness.MAX_GRAPHS + 1):
        (g,) = backward()
        torch.testing.assert_close(g, torch.full((3,), 2.0))
    assert len(forwards) == harness.MAX_GRAPHS  # backward calls never re-run the forward
    forwards.clear()
    step = harness.make_call(runner, sets, "forward+backward")
    assert len(forwards) == 1  # only the upstream's shapes were needed
    step()
    assert len(forwards) == 2


def test_compiled_is_specialised_per_shape(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    harness.compiled(lambda x: x + 1)
    assert seen == {"dynamic": False}


def test_commit_of_an_enclosing_repository_is_not_ours(monkeypatch):
    """A copy installed inside another project's checkout must not report that project's commit."""
    monkeypatch.setenv("FASTDENSITY_COMMIT", "abc1234")

    def git(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 0, stdout="/some/other/project\n9999999\n" if "--show-toplevel" in argv
                                           else "", stderr="")

    monkeypatch.setattr(record.subprocess, "run", git)
    assert record.git_commit() == "abc1234"


def test_device_slug_and_name():
    slug = harness.device_slug(CPU)
    assert slug.startswith("cpu-") and all(c.isalnum() or c == "-" for c in slug)
    assert "threads" in harness.device_name(CPU)


# ------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------


def _row(**over):
    row = {c: "" for c in CSV_COLUMNS}
    row.update(op="op", provider="eager", mode="forward", dtype="float32", shape="x[2]", device="dev",
               median_ms=1.0, p20_ms=0.9, p80_ms=1.1, gbps=10.0, bw_fraction=0.5, peak_mem_mb=float("nan"),
               torch="t", triton="tr", commit="c", date="2025-01-01T00:00:00Z")
    row.update(over)
    return row


def test_writer_appends_under_one_header(tmp_path):
    path = tmp_path / "sub" / "dev.csv"
    harness.ResultsWriter(path).append(_row())
    harness.ResultsWriter(path).append(_row(provider="compiled", median_ms=2.0))
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(CSV_COLUMNS) and len(lines) == 3
    rows = harness.read_rows(path)
    assert [r["provider"] for r in rows] == ["eager", "compiled"]
    assert rows[0]["peak_mem_mb"] == "" and rows[1]["median_ms"] == "2"


def test_writer_refuses_other_schemas(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("op,provider,time\nx,y,1\n")
    with pytest.raises(ValueError, match="has columns"):
        harness.ResultsWriter(path)
    with pytest.raises(ValueError, match="lacks columns"):
        harness.ResultsWriter(tmp_path / "new.csv").append({"op": "x"})


# ------------------------------------------------------------------------------------------------
# The run loop, with a deterministic timer
# ------------------------------------------------------------------------------------------------


class FixedTimer:
    """Runs the call twice and reports fixed times: what the harness does with them is what is tested."""

    def __init__(self, ms: float = 2.0):
        self.ms = ms
        self.calls = 0

    def __call__(self, fn):
        fn()
        fn()
        self.calls += 1
        return Timing(self.ms, 0.5 * self.ms, 1.5 * self.ms)

    def sync(self):
        pass


def _synthetic_cases(order: list[str]):
    def make():
        return (torch.randn(64, requires_grad=True),)

    def fn(name):
        def run(x):
            order.append(name)
            return (x * 3).sum()

        return run

    def broken():
        raise Unavailable("not installed here")

    def failing(x):
        raise RuntimeError("kernel exploded")

    providers = [
        Provider("compiled", lambda: Runner(fn("compiled")), compiles=True),
        Provider("eager", lambda: Runner(fn("eager"))),
        Provider("peer", broken),
        Provider("bad", lambda: Runner(failing)),
    ]
    case = Case("toy", "x[64]", torch.float32, make, providers, min_bytes={"forward": 2e6})
    missing = Case("missing_op", "x[1]", torch.float32, make, [Provider("eager", lambda: Runner(fn("x")))],
                   unavailable="fastdensity.ops.missing_op is not in this build")
    return {"toy": [case], "missing": [missing]}


def test_run_suite_rows_skips_and_order(tmp_path):
    order: list[str] = []
    writer = harness.ResultsWriter(tmp_path / "r.csv")
    result = bench_cmd.run_and_record(_synthetic_cases(order), device=CPU, writer=writer, progress=False,
                                      timer=FixedTimer(2.0), copy_bytes=2**20, log=lambda s: None)
    rows = harness.read_rows(tmp_path / "r.csv")
    assert rows[0]["op"] == "device_copy" and float(rows[0]["bw_fraction"]) == 1.0
    copy_gbps = float(rows[0]["gbps"])
    assert copy_gbps == pytest.approx(2 * 2**20 / 2e-3 / 1e9, rel=1e-4)  # bytes read + written / 2 ms
    measured = [(r["provider"], r["mode"]) for r in rows[1:]]
    # eager (all modes) before the compiling provider; the failing and unavailable ones are not rows
    assert measured == [("eager", m) for m in harness.MODES] + [("compiled", m) for m in harness.MODES]
    assert order.index("compiled") > max(i for i, name in enumerate(order) if name == "eager")
    fwd = rows[1]
    assert float(fwd["gbps"]) == pytest.approx(2e6 / 2e-3 / 1e9, rel=1e-4)
    assert float(fwd["bw_fraction"]) == pytest.approx(float(fwd["gbps"]) / copy_gbps, rel=1e-4)
    assert rows[2]["gbps"] == ""  # no minimum bytes for backward in this case: no GB/s
    assert fwd["peak_mem_mb"] == ""  # CPU: not measured
    assert fwd["saved_mb"] == "0"  # x * 3 saves no tensor for backward; measured on any device
    assert rows[2]["saved_mb"] == ""  # backward mode: its timed call runs no forward
    assert float(fwd["p20_ms"]) == 1.0 and float(fwd["p80_ms"]) == 3.0
    kinds = {(s.provider, s.kind) for s in result.skips}
    assert kinds == {("peer", "unavailable"), ("bad", "error"), ("eager", "unavailable")}
    assert all("kernel exploded" in s.reason for s in result.errors) and len(result.errors) == 3


def test_run_suite_respects_the_budget():
    result = bench_cmd.run_and_record(_synthetic_cases([]), device=CPU, budget_s=0.0, progress=False,
                                      timer=FixedTimer(), copy_bytes=2**20, log=lambda s: None)
    assert len(result.rows) == 1  # only the copy yardstick
    assert {s.kind for s in result.skips} == {"budget", "unavailable"}


def test_compiling_providers_get_their_share_of_a_tight_budget(monkeypatch):
    """Non-compiling providers may not spend the whole op: torch.compile keeps COMPILE_SHARE of it."""
    clock = [0.0]
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class TenSecondTimer(FixedTimer):
        def __call__(self, fn):
            clock[0] += 10.0
            return super().__call__(fn)

    def make():
        return (torch.randn(8, requires_grad=True),)

    providers = [Provider("eager", lambda: Runner(lambda x: x.sum())),
                 Provider("compiled", lambda: Runner(lambda x: x.sum()), compiles=True)]
    cases = [Case("toy", f"case{i}", torch.float32, make, providers) for i in range(3)]
    def measured(reserve: float) -> list[tuple[str, str]]:
        clock[0] = 0.0
        result = bench_cmd.run_and_record({"toy": cases}, device=CPU, budget_s=100.0, compile_reserve_s=reserve,
                                          progress=False, timer=TenSecondTimer(), copy_bytes=2**20, log=lambda s: None)
        return [(r["provider"], r["shape"]) for r in result.rows[1:]]

    # The copy takes 10 s of 100, leaving 90: eager until 10 + 0.6 * 90 = 64, compiled until 100.
    assert measured(5.0) == [("eager", "case0")] * 3 + [("eager", "case1")] * 3 + [("compiled", "case0")] * 3
    # No compilation could start in 0.4 * 90 = 36 s with a 50 s reserve: nothing is kept for it.
    assert measured(50.0) == [("eager", f"case{i}") for i in range(3) for _ in range(3)]


def test_a_timer_that_flushes_the_cache_gets_one_input_set():
    built = []

    def count(flushes: bool) -> int:
        built.clear()
        timer = FixedTimer()
        timer.flushes_cache = flushes
        case = Case("toy", "x[4]", torch.float32, lambda: built.append(1) or (torch.randn(4),),
                    [Provider("eager", lambda: Runner(lambda x: x * 2))], modes=("forward",))
        bench_cmd.run_and_record({"toy": [case]}, device=CPU, progress=False, timer=timer, copy_bytes=2**20,
                                 log=lambda s: None)
        return len(built)

    assert count(flushes=True) == 1  # do_bench on CUDA: L2 is flushed before every call
    assert count(flushes=False) == harness.rotation_count(16, harness.last_level_cache_bytes(CPU)) > 1


def test_without_a_progress_bar_every_row_and_skip_is_logged():
    lines = []
    result = bench_cmd.run_and_record(_synthetic_cases([]), device=CPU, progress=False, timer=FixedTimer(),
                                      copy_bytes=2**20, log=lines.append)
    assert len(lines) == 1 + (len(result.rows) - 1) + len(result.skips)  # the copy, then one line each
    assert any("toy x[64] float32 eager forward: median 2 ms" in line for line in lines)
    assert any(line.startswith("not measured: toy x[64] float32 bad forward: error") for line in lines)


def test_compiling_providers_need_the_reserve():
    result = bench_cmd.run_and_record(_synthetic_cases([]), device=CPU, budget_s=60.0, compile_reserve_s=1e6,
                                      progress=False, timer=FixedTimer(), copy_bytes=2**20, log=lambda s: None)
    assert {r["provider"] for r in result.rows[1:]} == {"eager"}
    assert any(s.provider == "compiled" and s.kind == "budget" and "compile" in s.reason for s in result.skips)


# ------------------------------------------------------------------------------------------------
# Report: tables and plots from a CSV the harness's own writer wrote
# ------------------------------------------------------------------------------------------------


def _write_synthetic_csv(path, device="NVIDIA H100 80GB HBM3", subject="fastdensity"):
    writer = harness.ResultsWriter(path)
    base = dict(device=device, dtype="bfloat16", shape="x[256,6144]")
    writer.append(_row(op="device_copy", provider="torch", gbps=3000.0, bw_fraction=1.0, **base))
    # Older runs of eager, before and after the current rows in the file: the latest by date must win.
    writer.append(_row(op="coupling", provider="eager", mode="forward+backward", median_ms=100.0,
                       date="2024-06-01T00:00:00Z", **base))
    for mode in harness.MODES:
        writer.append(_row(op="coupling", provider=subject, mode=mode, median_ms=1.0, gbps=2000.0,
                           bw_fraction=2 / 3, peak_mem_mb=10.0, **base))
        writer.append(_row(op="coupling", provider="eager", mode=mode, median_ms=4.0, peak_mem_mb=40.0, **base))
        writer.append(_row(op="coupling", provider="compiled", mode=mode, median_ms=0.5, peak_mem_mb=12.0, **base))
        writer.append(_row(op="coupling", provider="nflows", mode=mode, median_ms=8.0, **base))
    writer.append(_row(op="coupling", provider="eager", mode="forward+backward", median_ms=50.0,
                       date="2024-01-01T00:00:00Z", **base))


def test_markdown_shows_wins_and_losses(tmp_path):
    path = tmp_path / "nvidia-h100-80gb-hbm3.csv"
    _write_synthetic_csv(path)
    rows = harness.read_rows(path)
    table = report.markdown_table(rows, ["forward+backward"])
    line = next(l for l in table.splitlines() if l.startswith("| coupling"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "1" and cells[5] == "4" and cells[6] == "0.5" and cells[7] == "8 (nflows)"
    assert cells[8] == "4.00x"  # vs eager: the latest eager row (4 ms), not the older 100 or 50 ms ones
    assert cells[9] == "**0.50x slower**"  # the loss against compiled, shown plainly
    assert cells[10] == "8.00x" and cells[11] == "2e+03 (67%)" and cells[12] == "10 (40)"
    assert "device copy 3000 GB/s" in table and "fastdensity = the Triton kernels" in table
    assert len(report.comparisons(rows)) == 3  # one per mode
    text = report.text_table(rows)
    assert "0.50x slower" in text and "**" not in text


def test_the_kernel_alone_is_shown_beside_the_dispatching_op(tmp_path):
    path = tmp_path / "gpu.csv"
    _write_synthetic_csv(path)
    harness.ResultsWriter(path).append(_row(op="coupling", provider="fastdensity_kernel", mode="forward",
                                            median_ms=0.1, device="NVIDIA H100 80GB HBM3", dtype="bfloat16",
                                            shape="x[256,6144]"))
    line = next(l for l in report.markdown_table(harness.read_rows(path), ["forward"]).splitlines()
                if l.startswith("| coupling"))
    assert "| 1 (kernel 0.1) |" in line
    assert "(nflows)" in line  # the kernel variant is not a peer, however fast


def test_cpu_tables_name_eager_as_the_subject(tmp_path):
    path = tmp_path / "cpu-x.csv"
    _write_synthetic_csv(path, device="CPU x (2 threads)", subject="zuko")
    table = report.markdown_table(harness.read_rows(path), ["forward"])
    assert "the subject is eager" in table
    line = next(l for l in table.splitlines() if l.startswith("| coupling"))
    assert "(subject)" in line and "0.50x (zuko)" not in line
    assert "**0.12x slower**" in line  # compiled 0.5 ms vs eager 4 ms


def test_a_comparison_never_mixes_two_runs(tmp_path):
    """A later run of one op replaces that op's comparisons whole; other ops keep the earlier run."""
    path = tmp_path / "gpu.csv"
    writer = harness.ResultsWriter(path)
    first, second = "2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"
    for date, commit, gbps in ((first, "aaaaaaa", 3000.0), (second, "bbbbbbb", 2900.0)):
        writer.append(_row(op="device_copy", provider="torch", gbps=gbps, date=date, commit=commit))
    for op in ("one", "two"):
        for provider, ms in (("fastdensity", 1.0), ("eager", 4.0), ("compiled", 0.5)):
            writer.append(_row(op=op, provider=provider, median_ms=ms, date=first, commit="aaaaaaa"))
    for provider, ms in (("fastdensity", 2.0), ("eager", 3.0)):  # the second run measured only these
        writer.append(_row(op="one", provider=provider, median_ms=ms, date=second, commit="bbbbbbb"))
    comps = {c["op"]: c for c in report.comparisons(harness.read_rows(path))}
    assert {p: r["median_ms"] for p, r in comps["one"]["by"].items()} == {"fastdensity": "2", "eager": "3"}
    assert math.isnan(report.speedup(comps["one"], "compiled"))  # the second run did not measure it
    assert {p: r["date"] for p, r in comps["two"]["by"].items()} == dict.fromkeys(("fastdensity", "eager",
                                                                                    "compiled"), first)
    table = report.markdown_table(harness.read_rows(path))
    assert "commit bbbbbbb, run 2025-02-01T00:00:00Z, device copy 2900 GB/s" in table
    assert "commit aaaaaaa, run 2025-01-01T00:00:00Z, device copy 3000 GB/s" in table


def test_render_without_matplotlib_still_writes_the_tables(tmp_path, monkeypatch, capsys):
    path = tmp_path / "gpu.csv"
    _write_synthetic_csv(path)
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written = report.render([path], tmp_path / "out", readme)
    assert sorted(p.name for p in written) == ["README.md", "gpu.md"]
    assert "| coupling |" in readme.read_text() and "no plots for gpu" in capsys.readouterr().err


def test_render_writes_markdown_plots_and_readme_block(tmp_path):
    path = tmp_path / "nvidia-h100-80gb-hbm3.csv"
    _write_synthetic_csv(path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold table\n{report.END}\n\ntail\n")
    written = report.render([path], tmp_path / "out", readme)
    names = sorted(p.name for p in written)
    assert names == ["README.md", "memory-nvidia-h100-80gb-hbm3.png", "nvidia-h100-80gb-hbm3.md",
                     "speedup-nvidia-h100-80gb-hbm3.png"]
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    text = readme.read_text()
    assert "old table" not in text and text.endswith("tail\n") and "| coupling |" in text
    assert text.count(report.BEGIN) == 1
    with pytest.raises(ValueError, match="no <!-- fastdensity-bench:begin -->"):
        report.update_readme(tmp_path / "out" / "nvidia-h100-80gb-hbm3.md", "t")


# ------------------------------------------------------------------------------------------------
# The bench modules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quick", [True, False])
def test_every_module_builds_cases(quick):
    settings = harness.Settings(CPU, quick=quick)
    cases = suite.load_cases(None, settings)
    assert list(cases) == list(suite.MODULES)
    for op_cases in cases.values():
        assert op_cases
        for case in op_cases:
            names = [p.name for p in case.providers]
            assert len(names) == len(set(names)), case.op
            assert set(case.min_bytes) <= set(harness.MODES)
            if case.op.startswith("memory_"):
                # the memory benchmark compares one model storing its activations with the same model
                # rebuilding them by inversion, on the backend the device gets
                assert names == ["eager", "eager_invert"], case.op
                continue
            assert names[0] == "fastdensity" and "eager" in names, case.op
            # torch.compile of a whole model takes minutes on a CPU: quick runs leave it out
            assert ("compiled" in names) != (quick and case.op.startswith("train_step_"))
    with pytest.raises(ValueError, match="unknown benchmark nope"):
        suite.load_cases(["nope"], settings)


def test_gpu_case_lists_build(monkeypatch):
    """The GPU branches of every module (which CI never takes) build the issue's cases, each op case
    with a byte model for every mode. Built on CPU with ``Settings.cuda`` forced; nothing is run."""
    monkeypatch.setattr(harness.Settings, "cuda", property(lambda self: True))
    cases = suite.load_cases(None, harness.Settings(CPU))
    seen = {(c.op, c.shape, str(c.dtype)) for op_cases in cases.values() for c in op_cases}
    assert ("gaussian_mixture_log_prob", "shared B=1048576 K=256 D=64", "torch.bfloat16") in seen
    assert ("dmol_log_prob", "x[64,3,32,32] K=10", "torch.float32") in seen
    assert {op for op, _, _ in seen if op.startswith("masked_conv2d")} == {
        f"masked_conv2d_{k}x{k}_{t}" for k in (3, 5, 7) for t in "AB"}
    assert {op for op, _, _ in seen if op.startswith("train_step_")} == {
        "train_step_realnvp", "train_step_maf", "train_step_glow", "train_step_pixelcnn", "train_step_nsf",
        "train_step_tarflow"}
    assert {op for op, _, _ in seen if op.startswith(("sample_", "memory_"))} == {
        "sample_maf", "sample_pixelcnn", "sample_tarflow", "memory_coupling_stack", "memory_glow"}
    memory = [[p.name for p in c.providers] for c in cases["memory"]]
    assert memory == [["fastdensity", "fastdensity_invert"]] * 2
    for op_cases in cases.values():
        for case in op_cases:
            # a layer or a model has no single minimum-traffic figure; every op has one per mode
            whole = case.op == "coupling_layer" or case.op.startswith(("train_step_", "sample_", "memory_"))
            assert set(case.min_bytes) == (set() if whole else set(harness.MODES)), case.op


def test_dmol_traffic_counts_a_float64_output():
    from fastdensity.benchmarks import bench_dmol

    settings = harness.Settings(CPU)
    m = 2 * 4 * 4  # pixels of x [2, 3, 4, 4]
    for dtype, e, o in ((torch.float32, 4, 4), (torch.bfloat16, 2, 4), (torch.float64, 8, 8)):
        case = bench_dmol._case(settings, 2, 1, 4, dtype)
        assert case.min_bytes["forward"] == 12 * m + 10 * m * e + 2 * o
        assert case.min_bytes["forward+backward"] == case.min_bytes["forward"] + case.min_bytes["backward"]


def test_quick_inputs_are_real_values():
    settings = harness.Settings(CPU, quick=True)
    for op_cases in suite.load_cases([n for n in suite.MODULES if n != "models"], settings).values():
        for case in op_cases:
            if not case.unavailable:
                harness.check_inputs(case.make_inputs(), case.op)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_shifted_conv_peer_is_the_masked_conv(k, mask_type):
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(5, 4, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64)
    got = shifted_masked_conv2d(x, w, b, mask_type)
    torch.testing.assert_close(got, masked_conv2d(x, w, b, mask_type=mask_type))
    (gw,) = torch.autograd.grad(got.sum(), w)
    mask = pixelcnn_mask(5, 4, k, k, mask_type, dtype=torch.float64)
    assert torch.all(gw[mask == 0] == 0)  # dead taps are never read
    assert live_taps(k, mask_type) == int(mask[0, 0].sum())


def test_made_mask_is_block_triangular():
    mask = made_mask(64, 64, 8, CPU)
    assert 0.4 < mask.float().mean() < 0.7
    # Sorted degrees: every row is a prefix of the inputs, and the prefixes grow down the rows (a
    # staircase of dense diagonal blocks with nothing to their right: whole tiles to skip).
    counts = mask.sum(dim=1)
    assert all(torch.equal(mask[o], torch.arange(64) < counts[o]) for o in range(64))
    assert torch.all(counts[1:] >= counts[:-1]) and counts[0] > 0 and mask[-1].all()


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_results_path_policy(tmp_path):
    slug = "cpu-x"
    assert bench_cmd.results_path(_bench_args("--quick"), slug) is None  # smoke runs write nothing
    assert bench_cmd.results_path(_bench_args("--quick", "--results", str(tmp_path)), slug) == tmp_path / "cpu-x.csv"
    assert bench_cmd.results_path(_bench_args("--results", str(tmp_path), "--no-save"), slug) is None
    full = bench_cmd.results_path(_bench_args(), slug)
    assert full.name == "cpu-x.csv" and full.parent.name in ("results", "fastdensity-bench")


def test_quick_cli_end_to_end_on_cpu(tmp_path, capsys):
    args = _bench_args("--quick", "--op", "coupling", "--provider", "eager", "--device", "cpu", "--threads", "1",
                       "--budget", "40", "--results", str(tmp_path), "--no-progress")
    assert bench_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "Triton kernels need" in out and "affine_coupling" in out
    rows = harness.read_rows(tmp_path / f"{harness.device_slug(CPU)}.csv")
    assert rows[0]["op"] == "device_copy"
    measured = {(r["op"], r["mode"]) for r in rows[1:]}
    assert ("affine_coupling", "forward") in measured  # the first case always fits the budget
    for r in rows[1:]:
        assert r["provider"] == "eager" and r["dtype"] == "float32" and float(r["median_ms"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["torch"] == torch.__version__ and r["date"].endswith("Z")
    ac = [r for r in rows if r["op"] == "affine_coupling"]
    assert all(math.isfinite(float(r["gbps"])) for r in ac)


def test_cli_rejects_a_missing_gpu_and_unknown_ops(capsys):
    if not torch.cuda.is_available():
        assert bench_cmd.run(_bench_args("--device", "cuda", "--no-save")) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert bench_cmd.run(_bench_args("--op", "nope", "--device", "cpu", "--no-save")) == 2
    assert "unknown benchmark nope" in capsys.readouterr().err
