"""``benchmarks/run_gpu.sh`` on CPU (``FASTDENSITY_RUN_DEVICE=cpu``): the GPU run's plumbing without a GPU.

The dry run goes through every stage the GPU run has - verify through the interpreter, the headline,
models and compiled benchmark passes, a pytest selection, the report - at small sizes, and each stage
leaves its file in the output folder (at most 8 files, as the device tool returns). A stage cut by its
time limit keeps what it did: pytest's line per test so far, and, when TERM could interrupt it, its
summary naming the failures so far.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
STAGES = ("verify", "headline", "models", "compiled", "tests", "report")


def run_script(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    # A plain shell's environment: without this test process's TRITON_INTERPRET (set by conftest.py),
    # so that the script's own choice of the interpreter for verify is what runs.
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(FASTDENSITY_RUN_DEVICE="cpu", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], env=full, capture_output=True, text=True,
                          timeout=timeout)


def probe_wheel(folder: Path) -> Path:
    """A one-module pure-Python wheel, standing in for the peers' wheels the GPU run carries."""
    name, version = "fastdensity_probe", "0.1"
    files = {
        f"{name}/__init__.py": "VERSION = '0.1'\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }
    record = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(text.encode())}")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    return wheel


def test_headline_is_one_case_per_module_compared_with_a_yardstick(monkeypatch):
    """``fastdensity bench --headline`` (the headline stage): one case per module, the first with a
    yardstick where a module has one. GPU case lists, built on CPU with ``Settings.cuda`` forced."""
    import torch

    from fastdensity.benchmarks import cases, suite

    monkeypatch.setattr(cases.Settings, "cuda", property(lambda self: True))
    settings = cases.Settings(torch.device("cpu"))
    full = suite.load_cases(None, settings)
    headline = suite.load_cases(None, settings, headline=True)
    assert list(headline) == list(full)
    def key(case):
        return case.op, case.shape, case.dtype

    for module, picked in headline.items():
        assert len(picked) == 1, module
        with_yardstick = [c for c in full[module] if any(suite.is_yardstick(p.name) for p in c.providers)]
        assert key(picked[0]) == key(with_yardstick[0] if with_yardstick else full[module][0]), module
    # fastdensity's own providers and baselines are never the yardstick; a peer, torch's op, cuDNN are
    assert not any(suite.is_yardstick(n) for n in ("fastdensity", "fastdensity_kernel", "eager", "compiled"))
    assert all(suite.is_yardstick(n) for n in ("nflows", "torch.logsumexp", "dense_conv", "dense_matmul"))
    assert [c.op for c in headline["coupling"]] == ["coupling_layer"]  # the layer is compared with the peers


@pytest.mark.slow
def test_dry_run_reaches_every_stage_and_leaves_its_files(tmp_path):
    out = tmp_path / "out"
    wheel = probe_wheel(tmp_path / "wheels")
    # A budget well above the dry run's default 240 s: the stages' limits grow, their work hardly does
    # (small fixed selections; bench passes whose quick cases end long before their budget), so the run
    # still takes about two minutes, and a machine loaded by other jobs does not cut a stage.
    result = run_script(out, timeout=900, FASTDENSITY_GPU_BUDGET="600", FASTDENSITY_WHEELS=str(wheel.parent))
    log = (out / "run.log").read_text()
    assert result.returncode == 0, log + result.stderr[-3000:]
    for stage in STAGES:
        assert re.search(rf"\] {stage}: done$", log, re.M), f"stage {stage} not completed:\n{log}"
    assert "installed offline into" in log and wheel.name in log

    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files), files  # the device tool returns no subfolders here
    assert len(files) <= 8, files
    slug = next(f[:-4] for f in files if f.endswith(".csv"))
    for name in ("run.log", "verify.log", "bench.log", "gpu-tests.log", f"{slug}.csv", f"{slug}.md"):
        assert name in files, f"{name} missing: {files}"

    verify_log = (out / "verify.log").read_text()
    assert re.search(r" ok$", verify_log, re.M) and "0 failed" in verify_log, verify_log

    bench_log = (out / "bench.log").read_text()
    for stage in ("headline", "models", "compiled"):
        assert f"==== {stage}: fastdensity bench" in bench_log, bench_log

    with open(out / f"{slug}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # A results CSV committed for this device is continued: its rows come first, unchanged.
    committed = ROOT / "benchmarks" / "results" / f"{slug}.csv"
    if committed.is_file():
        with open(committed, newline="") as f:
            earlier = list(csv.DictReader(f))
        assert rows[:len(earlier)] == earlier
        rows = rows[len(earlier):]
    rows = [r for r in rows if r["op"] != "device_copy"]
    # One run date for the three passes, so the report sets compiled beside eager (it keeps, per case,
    # the rows of the newest run only).
    assert len({r["date"] for r in rows}) == 1, sorted({r["date"] for r in rows})
    assert {r["mode"] for r in rows} == {"forward+backward"}
    models = [r for r in rows if r["op"].startswith("train_step_")]
    # the models stage measures whole models: training steps, and backprop by inversion (memory_*)
    ops = [r for r in rows if not r["op"].startswith(("train_step_", "memory_", "sample_"))]
    assert models and any(r["provider"] == "compiled" for r in ops) and any(r["provider"] == "eager" for r in ops)
    from fastdensity.benchmarks import suite

    op_modules = [n for n in suite.names() if n not in suite.WHOLE_MODEL_MODULES]
    headline_cases = {(r["op"], r["shape"], r["dtype"]) for r in ops if r["provider"] != "compiled"}
    assert 1 <= len(headline_cases) <= len(op_modules), sorted(headline_cases)  # --headline: one case per op

    tests_log = (out / "gpu-tests.log").read_text()
    assert " PASSED" in tests_log and re.search(r"\d+ passed", tests_log), tests_log[-3000:]

    # The report's table sets each compiled figure beside the subject's (eager on CPU) of the same case.
    table = [line.split(" | ") for line in (out / f"{slug}.md").read_text().splitlines() if line.startswith("| ")]
    header, body = table[0], table[2:]
    this_run = {(r["op"], r["shape"], r["dtype"]) for r in rows}  # not the continued CSV's earlier cases
    compiled_rows = [r for r in body if r[header.index("compiled ms")] != "-"
                     and (r[0].removeprefix("| "), r[1], r[2]) in this_run]
    assert compiled_rows and all("(eager)" in r[header.index("subject ms")] for r in compiled_rows), table


#: the last test of the selection the cut stage runs: one that TERM interrupts (pytest then prints its
#: summary), and one that ignores TERM, as a hung CUDA call would, and is killed 10 s later
HANGS = {
    "interrupted": "def test_hangs():\n    time.sleep(600)\n",
    "killed": "def test_hangs():\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(600)\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(HANGS))
def test_a_stage_cut_by_its_time_limit_keeps_what_it_did(tmp_path, how):
    selection = tmp_path / "cut"
    selection.mkdir()
    (selection / "test_cut.py").write_text(
        "import signal\nimport time\n\n"
        "def test_quick():\n    pass\n\n"
        "def test_planted_failure():\n    assert False, 'planted failure'\n\n" + HANGS[how])
    out = tmp_path / "out"
    # 30 s for the stage: pytest gets TERM after 20 (and KILL 10 s later, the script's grace), by when
    # the first two tests have long ended and the third sleeps.
    result = run_script(out, timeout=300, FASTDENSITY_STAGES="tests", FASTDENSITY_LIMIT_TESTS="30",
                        FASTDENSITY_PYTEST_ARGS=str(selection), FASTDENSITY_WHEELS=str(tmp_path / "none"))
    log = (out / "run.log").read_text()
    assert result.returncode == 1, log  # a failure was found before the cut: that decides the status
    assert f"tests: cut by its time limit (exit {124 if how == 'interrupted' else 137})" in log, log
    tests_log = (out / "gpu-tests.log").read_text()
    # Streamed as each test ended (-v), so even a killed pytest has named what it did.
    assert re.search(r"test_quick PASSED", tests_log), tests_log
    assert re.search(r"test_planted_failure FAILED", tests_log), tests_log
    assert re.search(r"tests: 1 passed, 1 failed or errors", log), log
    if how == "interrupted":  # and the summary printed on the interrupt names the failure with its reason
        assert "KeyboardInterrupt" in tests_log, tests_log
        assert re.search(r"^FAILED .*test_planted_failure - AssertionError: planted failure$", tests_log, re.M)
        assert re.search(r"^FAILED .*test_planted_failure", log, re.M), log  # which run.log repeats
