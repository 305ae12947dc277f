"""``fastdensity verify``: passes for the real kernels under the interpreter, fails for broken ones."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from fastdensity import op_table, verify
from fastdensity.commands import verify as verify_cmd
from fastdensity.kernels import coupling as coupling_kernel
from helpers import requires_interpreter

CPU = torch.device("cpu")


def _args(*argv):
    parser = argparse.ArgumentParser()
    verify_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@requires_interpreter
def test_coupling_passes_through_the_interpreter(capsys):
    assert verify_cmd.run(_args("--device", "cpu", "--op", "affine_coupling")) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("affine_coupling")]
    # 3 cases x 2 dtypes x (y, logdet, grad x, grad h)
    assert len(lines) == 24 and all(l.rstrip().endswith("ok") for l in lines)
    assert "float64" in out and "float32" in out and "0 failed" in out


@requires_interpreter
def test_a_wrong_forward_fails_with_nonzero_exit(monkeypatch, capsys):
    real = coupling_kernel.coupling_forward

    def off_by_a_little(*args):
        y, logdet = real(*args)
        return y + 1e-3, logdet  # 1e-3 is ~100x the fp32 bound (2 x eager error + 1e-5)

    monkeypatch.setattr(coupling_kernel, "coupling_forward", off_by_a_little)
    assert verify_cmd.run(_args("--device", "cpu", "--op", "affine_coupling", "--dtype", "float32")) == 1
    out = capsys.readouterr().out
    failed = [l for l in out.splitlines() if "FAIL" in l]
    assert failed and all(" y " in l for l in failed)  # only the output that is wrong fails


@requires_interpreter
def test_a_wrong_gradient_fails(monkeypatch):
    real = coupling_kernel.coupling_backward

    def scaled(*args):
        grad_in, grad_h, grad_t = real(*args)
        return grad_in, grad_h * 1.01, grad_t

    monkeypatch.setattr(coupling_kernel, "coupling_backward", scaled)
    outcomes = verify.verify(CPU, ["affine_coupling"], [torch.float64])
    bad = {c.name for o in outcomes for c in o.comparisons if not c.passed}
    assert bad == {"grad h"}


@requires_interpreter
def test_an_unwritten_output_fails(monkeypatch):
    """Outputs start as NaN: a kernel that skips an element is caught."""
    real = coupling_kernel.coupling_forward

    def forgets_the_last_row(x, *rest):
        y, logdet = real(x, *rest)
        y[-1] = float("nan")
        return y, logdet

    monkeypatch.setattr(coupling_kernel, "coupling_forward", forgets_the_last_row)
    outcome = verify.check(verify.cases(CPU, ["affine_coupling"])[0], torch.float32, CPU)
    assert not outcome.passed
    assert any("NaN" in c.why for c in outcome.comparisons if c.name == "y")


@requires_interpreter
def test_a_raising_kernel_fails_and_a_missing_op_is_skipped(monkeypatch):
    def boom(*args):
        raise RuntimeError("no such luck")

    monkeypatch.setattr(coupling_kernel, "coupling_forward", boom)
    case = verify.cases(CPU, ["affine_coupling"])[0]
    outcome = verify.check(case, torch.float32, CPU)
    assert not outcome.passed and "no such luck" in outcome.error
    import fastdensity.ops

    monkeypatch.delattr(fastdensity.ops, "affine_coupling")
    outcome = verify.check(case, torch.float32, CPU)
    assert outcome.passed and "not in this build" in outcome.skipped
    table = verify.format_table([outcome])
    assert "skipped: fastdensity.ops.affine_coupling is not in this build" in table


@requires_interpreter
def test_an_exception_while_comparing_fails_only_its_case(monkeypatch):
    """A kernel output of the wrong shape makes compare() raise: that case fails, the run goes on."""
    real = verify.compare

    def picky(name, *tensors):
        if name == "logdet":
            raise ValueError("logdet: shapes differ")
        return real(name, *tensors)

    monkeypatch.setattr(verify, "compare", picky)
    outcomes = verify.verify(CPU, ["affine_coupling"], [torch.float64])
    assert len(outcomes) == 3 and all(not o.passed for o in outcomes)
    assert all(o.error == "comparison: ValueError: logdet: shapes differ" for o in outcomes)


def test_cases_take_every_op_before_any_op_twice():
    """Round-robin order: a run cut short by its time limit has still checked every op once."""
    builders = verify.builders()
    for cuda in (False, True):
        device = torch.device("cuda" if cuda else "cpu")
        cases = verify.cases(device)
        first_of_each = [build(cuda)[0].function for build in builders.values()]
        assert [c.function for c in cases[:len(builders)]] == first_of_each
        assert sorted(c.function for c in cases) == sorted(c.function for build in builders.values()
                                                           for c in build(cuda))


def test_every_op_has_cases_on_both_devices():
    assert list(verify.builders()) == op_table.names()
    for cuda in (False, True):
        for name, build in verify.builders().items():
            cases = build(cuda)
            assert len(cases) >= 2, name
            # every public function of the op is checked
            assert {c.function for c in cases} == set(op_table.BY_NAME[name].functions), name
            for c in cases:
                assert c.grad_args and all(i < len(c.arg_names) for i in c.grad_args)
    with pytest.raises(ValueError, match="unknown op nope"):
        verify.cases(CPU, ["nope"])
    assert verify.dtypes_for(CPU) == [torch.float32, torch.float64]


def test_op_and_function_names_select_the_same_cases():
    by_op = [c.label for c in verify.cases(CPU, ["coupling"])]
    assert by_op and by_op == [c.label for c in verify.cases(CPU, ["affine_coupling"])]
    assert {c.function for c in verify.cases(CPU, ["mixture"])} == {"gaussian_mixture_log_prob",
                                                                     "logistic_mixture_log_prob"}


def test_cli_reruns_itself_under_the_interpreter(tmp_path):
    """Started without TRITON_INTERPRET, `fastdensity verify --device cpu` must re-run in a child that
    sets it, and that child must import the same fastdensity as its parent, even from a folder (a
    source checkout, say) whose own fastdensity/ would come first on `python -m`'s path."""
    (tmp_path / "fastdensity").mkdir()
    (tmp_path / "fastdensity" / "__init__.py").write_text("raise ImportError('the wrong fastdensity')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The parent, like the console script, imports the installed package, not the folder it runs in.
    parent = "import sys; sys.path.remove(''); from fastdensity.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", parent, "verify", "--device", "cpu", "--op", "logsumexp",
                           "--dtype", "float64"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Triton's interpreter" in done.stdout and "0 failed" in done.stdout
