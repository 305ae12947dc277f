"""The ``fastdensity`` command: train / evaluate / sample end to end on tiny budgets, and their errors."""
from __future__ import annotations

import importlib.metadata
import json
import re
import runpy
import sys

import numpy as np
import pytest

from fastdensity import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--set", "hidden=8", "--set", "num_layers=2", "--no-progress"]


def run_cli(capsys, *argv):
    """``fastdensity ARGV`` in this process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# train / evaluate / sample end to end
# ------------------------------------------------------------------------------------------------


def test_train_evaluate_sample_2d(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "train", "--data", "8gaussians", "--steps", 30, "--batch-size", 128,
                                   "--out", out, "--json", *TINY)
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["model"] == "realnvp" and metrics["data"] == "8gaussians" and metrics["steps"] == 30
    assert "true NLL (entropy of 8gaussians)" in stderr and "KL gap to the truth" in stderr
    for name in ("metrics.json", "checkpoint.pt", "log.jsonl", "samples.png", "density.png"):
        assert (out / name).exists(), name
    assert (out / "density.png").read_bytes()[:8] == PNG_MAGIC

    code, stdout, _ = run_cli(capsys, "evaluate", out / "checkpoint.pt", "--data", "8gaussians", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["nll"] == pytest.approx(metrics["test_nll"], rel=1e-9)
    assert result["kl_gap"] == pytest.approx(metrics["kl_gap"], rel=1e-9) and result["examples"] == 20_000
    code, stdout, _ = run_cli(capsys, "evaluate", out)  # the run directory; the data from the checkpoint
    assert code == 0 and "realnvp on 8gaussians (test, 20,000 examples)" in stdout and "KL gap" in stdout

    code, stdout, _ = run_cli(capsys, "sample", out, "-n", 50, "--out", tmp_path / "s.npy", "--seed", 3)
    assert code == 0 and "wrote 50 samples" in stdout
    s = np.load(tmp_path / "s.npy", allow_pickle=False)
    assert s.shape == (50, 2) and s.dtype == np.float32 and np.isfinite(s).all()
    run_cli(capsys, "sample", out, "-n", 50, "--out", tmp_path / "again.npy", "--seed", 3)
    assert np.array_equal(np.load(tmp_path / "again.npy"), s)  # the seed fixes the draw
    code, _, _ = run_cli(capsys, "sample", out, "-n", 20, "--out", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


def test_default_command_is_realnvp_on_checkerboard(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "train", "--steps", 3, "--out", tmp_path, "--json", "--no-progress",
                                   "--no-plots")
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert (metrics["model"], metrics["data"], metrics["batch_size"]) == ("realnvp", "checkerboard", 512)
    assert metrics["true_nll"] == pytest.approx(np.log(8))


def test_train_and_sample_digits_pixelcnn(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "train", "--model", "pixelcnn", "--data", "digits", "--steps", 3,
                              "--batch-size", 16, "--out", tmp_path, "--set", "hidden=4", "--set", "num_blocks=1",
                              "--no-progress")
    assert code == 0, stderr
    assert "independent-pixel baseline" in stderr and (tmp_path / "samples.png").exists()
    code, _, _ = run_cli(capsys, "sample", tmp_path, "-n", 3, "--out", tmp_path / "d.npy")
    assert code == 0
    d = np.load(tmp_path / "d.npy")
    assert d.shape == (3, 1, 8, 8) and d.dtype == np.uint8 and d.max() <= 16
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path, "--data", "digits", "--json")
    assert code == 0 and json.loads(stdout)["nll_kind"].startswith("exact discrete")


def test_train_on_a_user_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "points.npy", rng.normal(size=(300, 3)).astype(np.float32) * [1.0, 2.0, 0.5])
    code, stdout, stderr = run_cli(capsys, "train", "--model", "maf", "--data", tmp_path / "points.npy",
                                   "--steps", 10, "--out", tmp_path / "run", "--json", *TINY)
    assert code == 0, stderr
    assert json.loads(stdout)["data"] == "points" and (tmp_path / "run" / "samples.png").exists()
    assert not (tmp_path / "run" / "density.png").exists()  # 3-D data: no density picture
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path / "run", "--data", tmp_path / "points.npy", "--json")
    assert code == 0 and json.loads(stdout)["nll"] == pytest.approx(json.loads((tmp_path / "run" / "metrics.json")
                                                                               .read_text())["test_nll"])


def test_model_choices_match_the_registry():
    """``--model``'s choices are spelled out in the command (so ``--help`` imports no torch): keep them in step."""
    from fastdensity.commands import train as train_command
    from fastdensity.models import MODELS

    assert train_command.MODELS == tuple(MODELS)


def test_optimizer_flag(tmp_path, capsys):
    """``--optimizer adamw`` trains with AdamW and the checkpoint says so; resuming it with another optimizer
    is refused, with the same one it continues. The choices are spelled out like ``--model``'s."""
    from fastdensity.commands import train as train_command
    from fastdensity.training import OPTIMIZERS, load_checkpoint

    assert train_command.OPTIMIZERS == tuple(OPTIMIZERS)
    code, _, stderr = run_cli(capsys, "train", "--optimizer", "adamw", "--steps", 3, "--out", tmp_path, "--no-plots",
                              *TINY)
    assert code == 0, stderr
    assert load_checkpoint(str(tmp_path))["optimizer"]["param_groups"][0]["decoupled_weight_decay"] is True
    code, _, stderr = run_cli(capsys, "train", "--resume", "--optimizer", "adam", "--steps", 4, "--out", tmp_path,
                              "--no-progress")
    assert code == 2 and "cannot resume with optimizer 'adam'" in stderr
    code, _, stderr = run_cli(capsys, "train", "--resume", "--optimizer", "adamw", "--steps", 4, "--out", tmp_path,
                              "--no-progress", "--no-plots")
    assert code == 0, stderr
    assert load_checkpoint(str(tmp_path))["step"] == 4

def test_python_dash_m_and_console_script(capsys, monkeypatch):
    """``python -m fastdensity`` runs ``fastdensity/__main__.py``; here in this interpreter (runpy does what
    ``-m`` does), as a fresh interpreter costs seconds and test_train's SIGKILL and gloo tests already
    start ``python -m fastdensity train`` in new processes."""
    monkeypatch.setattr(sys, "argv", ["fastdensity", "train", "--help"])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_module("fastdensity", run_name="__main__", alter_sys=True)
    assert exit_status.value.code == 0
    stdout = capsys.readouterr().out
    assert "--resume" in stdout and "realnvp" in stdout
    # The console script that pip writes calls its entry point.
    scripts = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fastdensity"]
    if scripts:  # installed with pip
        assert scripts[0].load() is cli.main


# ------------------------------------------------------------------------------------------------
# Errors: exit status 2 and a message that says what is wrong
# ------------------------------------------------------------------------------------------------


def _write_bad_files(tmp_path):
    np.save(tmp_path / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    nan = np.zeros((20, 2), dtype=np.float32)
    nan[3, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "flat.npy", np.zeros(20, dtype=np.float32))


@pytest.mark.parametrize("args,message", [
    (["--data", "{tmp}/missing.npy"], "does not exist"),
    (["--data", "{tmp}/pickled.npy"], "pickled Python objects"),
    (["--data", "{tmp}/nan.npy"], r"NaN or infinite value\(s\), the first at index \(3, 0\)"),
    (["--data", "{tmp}/flat.npy"], r"must have shape \[N, D\]"),
    (["--data", "swissroll"], "unknown data 'swissroll'"),
    (["--model", "pixelcnn", "--data", "moons"], r"pixelcnn models images"),
    (["--set", "depth=3"], "options are num_layers, hidden"),
    (["--resume"], "cannot resume: no checkpoint at"),
    (["--resume", "--lr", "1e-3"], "--lr cannot change"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--device", "gpu"], "'gpu' is not a device name PyTorch knows"),
])
def test_train_errors(tmp_path, capsys, args, message):
    _write_bad_files(tmp_path)
    argv = ["train", "--out", tmp_path / "run", "--no-progress", *[a.format(tmp=tmp_path) for a in args]]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2
    assert stderr.startswith("fastdensity train: error:")
    assert re.search(message, stderr), stderr


def test_evaluate_and_sample_errors(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "evaluate", tmp_path / "nothing.pt", "--data", "moons")
    assert code == 2 and "checkpoint" in stderr and "does not exist" in stderr
    assert run_cli(capsys, "train", "--data", "moons", "--steps", 2, "--out", tmp_path, "--no-plots", *TINY)[0] == 0
    code, _, stderr = run_cli(capsys, "evaluate", tmp_path, "--data", "digits")
    assert code == 2 and "models examples of shape [2]; digits has shape [1, 8, 8]" in stderr
    code, _, stderr = run_cli(capsys, "sample", tmp_path, "-n", 5, "--out", tmp_path / "s.txt")
    assert code == 2 and "--out must end in .png or .npy" in stderr
    code, _, stderr = run_cli(capsys, "sample", tmp_path, "-n", 0, "--out", tmp_path / "s.npy")
    assert code == 2 and "-n must be >= 1" in stderr
    for command in (["evaluate", tmp_path], ["sample", tmp_path, "--out", tmp_path / "s.npy"]):
        code, _, stderr = run_cli(capsys, *command, "--device", "gpu")
        assert code == 2 and f"fastdensity {command[0]}: error: device 'gpu' is not a device name" in stderr


def test_evaluate_reproduces_a_dequantized_test_nll(tmp_path, capsys):
    """A continuous model on discrete data is scored through random dequantization noise: by default
    ``evaluate`` draws the noise training drew for the test split, so it reports training's figure."""
    code, stdout, stderr = run_cli(capsys, "train", "--model", "gmm", "--data", "digits", "--steps", 2,
                                   "--out", tmp_path, "--set", "components=2", "--seed", 4, "--no-plots",
                                   "--no-progress", "--json")
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["nll_kind"].startswith("dequantized")
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path, "--json")
    assert code == 0 and json.loads(stdout)["nll"] == pytest.approx(metrics["test_nll"], rel=1e-12)
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path, "--json", "--seed", 0)  # other noise, other figure
    assert code == 0 and json.loads(stdout)["nll"] != pytest.approx(metrics["test_nll"], rel=1e-9)


def test_evaluate_finds_the_training_split_of_a_file_given_by_another_path(tmp_path, capsys, monkeypatch):
    """A run on a file with a non-default split seed: evaluating the same file by a relative path scores the
    same test split (the stored seed is used), so the NLL is training's own figure."""
    from fastdensity.training import TrainConfig, train

    np.save(tmp_path / "points.npy", np.random.default_rng(1).normal(size=(200, 2)).astype(np.float32))
    metrics = train(TrainConfig(model="gmm", data=str(tmp_path / "points.npy"), split_seed=7, steps=2, device="cpu",
                                model_args={"components": 2}, out=str(tmp_path / "run")), progress=False, plots=False)
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(capsys, "evaluate", "run", "--data", "points.npy", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["nll"] == pytest.approx(metrics["test_nll"], rel=1e-12)


def test_non_finite_loss_exits_1_naming_the_step(tmp_path, capsys, monkeypatch):
    from fastdensity.training import loop

    forward = loop.Objective.forward
    calls = {"n": 0}

    def poisoned(self, y, logdet, context=None):
        calls["n"] += 1
        out = forward(self, y, logdet, context)
        return out + float("inf") if calls["n"] == 4 else out

    monkeypatch.setattr(loop.Objective, "forward", poisoned)
    code, _, stderr = run_cli(capsys, "train", "--steps", 10, "--checkpoint-every", 2, "--out", tmp_path,
                              "--no-plots", *TINY)
    assert code == 1
    assert "non-finite (inf) at step 4; the last good checkpoint (step 2) is kept" in stderr
