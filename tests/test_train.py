"""fastdensity.training: training lowers the NLL, resume after SIGKILL is bit-exact, a NaN stops the run and
keeps the last good checkpoint, two gloo processes follow one process, checkpoints are atomic and safe."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdensity import data as fdata
from fastdensity import training as ftrain
from fastdensity.atomic_io import atomic_write
from fastdensity.models import build_model
from fastdensity.training import TrainConfig, TrainingDiverged, train
from fastdensity.training import checkpoint, loop, run_directory
from helpers import StopTraining, requires_cuda, stop_training_at

TINY_REALNVP = {"hidden": 8, "num_layers": 2}


def _config(out, **kw):
    base = dict(model="realnvp", data="checkerboard", steps=20, batch_size=64, eval_every=10, device="cpu",
                model_args=dict(TINY_REALNVP), out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _cli_args(config: TrainConfig):
    args = ["--model", config.model, "--data", config.data, "--steps", str(config.steps),
            "--batch-size", str(config.batch_size), "--eval-every", str(config.eval_every), "--device", "cpu",
            "--no-plots", "--no-progress"]
    if config.checkpoint_every is not None:
        args += ["--checkpoint-every", str(config.checkpoint_every)]
    for k, v in config.model_args.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


def _initial_nll(config: TrainConfig) -> float:
    """Test NLL of the model exactly as training initialises it (the same function builds it)."""
    data = fdata.load_data(config.data)
    config = ftrain.resolve_defaults(config, data)
    model, pre = ftrain.initial_model(config, data, ftrain.model_args_for(config.model, data, config.model_args))
    return ftrain.evaluate(model, data.test, data, pre, seed=config.seed + ftrain.EVAL_SEED_OFFSET["test"])["nll"]


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Training works
# ------------------------------------------------------------------------------------------------

SHORT_RUNS = [
    # (model, data, steps, batch, lr, model args, required drop in nats per example)
    ("realnvp", "8gaussians", 200, 256, 3e-3, {"hidden": 32, "num_layers": 4}, 0.4),
    ("glow", "moons", 400, 256, 3e-3, {"hidden": 32, "num_steps": 3}, 0.3),
    # k-means++ already places the components well: training has less to win.
    ("gmm", "moons", 300, 256, 1e-2, {"components": 16}, 0.08),
    ("maf", "digits", 300, 64, 3e-3, {"hidden": 64, "num_layers": 2}, 10.0),
    ("pixelcnn", "digits", 40, 32, 3e-3, {"hidden": 16, "num_blocks": 1, "num_mixtures": 2}, 10.0),
]


@pytest.mark.parametrize("model,data,steps,batch,lr,args,drop", SHORT_RUNS, ids=[f"{m}-{d}" for m, d, *_ in SHORT_RUNS])
def test_short_run_lowers_nll(tmp_path, model, data, steps, batch, lr, args, drop):
    config = _config(tmp_path, model=model, data=data, steps=steps, batch_size=batch, eval_every=steps,
                     model_args=args, lr=lr)
    start = _initial_nll(config)
    metrics = train(config, progress=False, plots=False)
    assert math.isfinite(metrics["test_nll"])
    assert metrics["test_nll"] < start - drop, (start, metrics["test_nll"])
    assert metrics["bits_per_dim"] == pytest.approx(metrics["test_nll"] / (metrics["dim"] * math.log(2)))
    if data == "digits":
        assert metrics["baseline_bits_per_dim"] == pytest.approx(2.4233, abs=1e-3)
        kind = "exact discrete" if model == "pixelcnn" else "dequantized"
        assert metrics["nll_kind"].startswith(kind)
    else:
        # The paired gap and the difference of the two NLLs estimate the same KL; they differ by the
        # test set's mean log p minus the Monte Carlo entropy, whose standard errors are ~0.01 nats
        # (20,000 test points) and ~0.003: 0.05 is several of those.
        assert metrics["kl_gap"] == pytest.approx(metrics["test_nll"] - metrics["true_nll"], abs=0.05)


def test_outputs_and_checkpoint_contents(tmp_path):
    metrics = train(_config(tmp_path, steps=12, eval_every=4, checkpoint_every=6), progress=False, plots=True)
    files = sorted(os.listdir(tmp_path))
    # No lock or temporary file is left; the checkpoint of step 6 is kept as the previous one.
    assert files == ["checkpoint.prev.pt", "checkpoint.pt", "density.png", "log.jsonl", "metrics.json",
                     "samples.png"], files
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["step"] == 6
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("test_nll", "bits_per_dim", "true_nll", "kl_gap", "steps", "seconds", "device"):
        assert key in on_disk
    assert on_disk["true_nll"] == pytest.approx(math.log(8)) and on_disk["steps"] == 12
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain data only
    assert ckpt["step"] == 12 and ckpt["config"]["model"] == "realnvp" and ckpt["config"]["steps"] == 12
    assert ckpt["model"] == {"name": "realnvp", "args": {"shape": [2], "num_layers": 2, "hidden": 8,
                                                         "num_hidden": 2, "scale": "softclamp", "actnorm": True,
                                                         "context_features": None}}
    assert ckpt["data"]["name"] == "checkerboard" and ckpt["preprocess"] == {"type": "identity"}
    assert "state" in ckpt["optimizer"] and isinstance(ckpt["rng"]["torch"], torch.Tensor)
    assert ckpt["checksum"]["algorithm"] == "sha256" and len(ckpt["checksum"]["digest"]) == 64
    model, pre = ftrain.model_from_checkpoint(ckpt)
    data = fdata.load_data("checkerboard")
    again = ftrain.evaluate(model, data.test, data, pre, seed=ftrain.EVAL_SEED_OFFSET["test"])  # training's seed 0
    assert again["nll"] == pytest.approx(metrics["test_nll"], rel=1e-9)


def test_training_restores_thread_count(tmp_path, monkeypatch):
    """The run uses its own thread count (one more than the caller's, which conftest sets to 1) and
    gives the caller's back when it ends."""
    before = torch.get_num_threads()
    seen = []
    forward = loop.Objective.forward

    def spy(self, y, logdet, context=None):
        seen.append(torch.get_num_threads())
        return forward(self, y, logdet, context)

    monkeypatch.setattr(loop.Objective, "forward", spy)
    train(_config(tmp_path, steps=2, threads=before + 1), progress=False, plots=False)
    assert seen == [before + 1] * 2 and torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------------
# Resume after a kill: bit-exact
# ------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    # Evaluations (every 25 steps) between checkpoints (every 100): the killed run's log runs ahead of its
    # checkpoint, and the resumed run must redo those entries rather than duplicate them.
    # 800 steps: ~3 ms each, so the kill window (after the first checkpoint, while the log is ahead of the
    # checkpoint) stays open for seconds against a 5 ms poll.
    settings = dict(steps=800, batch_size=32, eval_every=25, checkpoint_every=100)
    config = _config(tmp_path / "killed", **settings)
    proc = subprocess.Popen([sys.executable, "-m", "fastdensity", "train", *_cli_args(config), "--out", config.out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_path = os.path.join(config.out, ftrain.CHECKPOINT_NAME)
    log_path = os.path.join(config.out, "log.jsonl")

    def log_is_ahead():
        if not os.path.exists(ckpt_path):
            return False
        with open(log_path) as f:
            steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]  # complete lines only
        return bool(steps) and steps[-1] > ftrain.load_checkpoint(ckpt_path)["step"]

    deadline = time.monotonic() + 120
    while not log_is_ahead():
        assert proc.poll() is None, f"training exited before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ftrain.load_checkpoint(ckpt_path)["step"]
    assert 0 < killed_at < 800

    resumed = train(TrainConfig(out=config.out, device="cpu"), resume=True, progress=False, plots=False)
    assert not [f for f in os.listdir(config.out) if f.startswith(".tmp-")]  # a write cut by the kill is swept
    full = train(_config(tmp_path / "full", **settings), progress=False, plots=False)
    a = ftrain.load_checkpoint(ckpt_path)
    b = ftrain.load_checkpoint(str(tmp_path / "full"))
    assert a["step"] == b["step"] == 800
    assert _states_equal(a["state_dict"], b["state_dict"]), "resumed parameters differ from the uninterrupted run"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert _states_equal(sa, sb)
    assert resumed["test_nll"] == full["test_nll"]
    log_resumed = [json.loads(r) for r in open(os.path.join(config.out, "log.jsonl"))]
    log_full = [json.loads(r) for r in open(tmp_path / "full" / "log.jsonl")]
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop_time(log_resumed) == drop_time(log_full)  # no duplicated or missing evaluations


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume: no checkpoint at"):
        train(TrainConfig(out=str(tmp_path), device="cpu"), resume=True, progress=False, plots=False)


def test_resume_can_extend_a_finished_run(tmp_path):
    train(_config(tmp_path, steps=10), progress=False, plots=False)
    metrics = train(TrainConfig(out=str(tmp_path), steps=14, device="cpu"), resume=True, progress=False,
                    plots=False)
    assert metrics["steps"] == 14 and ftrain.load_checkpoint(str(tmp_path))["step"] == 14


def test_adamw_is_chosen_by_name_and_restored_on_resume(tmp_path, monkeypatch):
    settings = dict(steps=14, eval_every=7, checkpoint_every=5, optimizer="adamw")
    full = train(_config(tmp_path / "full", **settings), progress=False, plots=False)
    b = ftrain.load_checkpoint(str(tmp_path / "full"))
    assert b["config"]["optimizer"] == "adamw" and b["config"]["weight_decay"] == 0.01  # AdamW's default decay
    assert b["optimizer"]["param_groups"][0]["decoupled_weight_decay"] is True

    # Stop at step 12 (the last checkpoint is step 10), then resume: the run must rebuild AdamW, not Adam.
    with monkeypatch.context() as patch:
        stop_training_at(patch, 12)
        with pytest.raises(StopTraining):
            train(_config(tmp_path / "stopped", **settings), progress=False, plots=False)
    assert ftrain.load_checkpoint(str(tmp_path / "stopped"))["step"] == 10
    with pytest.raises(ValueError, match="cannot resume with optimizer 'adam': the checkpoint's run trains with "
                                         "'adamw'"):
        train(TrainConfig(out=str(tmp_path / "stopped"), optimizer="adam", device="cpu"), resume=True,
              progress=False, plots=False)
    resumed = train(TrainConfig(out=str(tmp_path / "stopped"), device="cpu"), resume=True, progress=False,
                    plots=False)
    a = ftrain.load_checkpoint(str(tmp_path / "stopped"))
    assert _states_equal(a["state_dict"], b["state_dict"]) and resumed["test_nll"] == full["test_nll"]

    # The name picks the update: Adam with the same decay (an L2 term in the gradient) ends elsewhere.
    train(_config(tmp_path / "adam", **dict(settings, optimizer="adam", weight_decay=0.01)), progress=False,
          plots=False)
    adam = ftrain.load_checkpoint(str(tmp_path / "adam"))
    assert adam["config"]["optimizer"] == "adam" and not _states_equal(adam["state_dict"], b["state_dict"])


def test_optimizer_names_are_checked():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose one of adam, adamw"):
        ftrain.resolve_defaults(TrainConfig(optimizer="sgd"), fdata.load_data("moons"))
    adam = ftrain.resolve_defaults(TrainConfig(), fdata.load_data("moons"))
    assert (adam.optimizer, adam.weight_decay) == ("adam", 0.0)  # Adam without decay, as before the choice existed


# ------------------------------------------------------------------------------------------------
# A non-finite loss stops the run and keeps the last good checkpoint
# ------------------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = loop.Objective.forward

    def poisoned(self, y, logdet, context=None):
        calls["n"] += 1
        out = forward(self, y, logdet, context)
        return out * float("nan") if calls["n"] == 13 else out  # the 13th training step's loss

    monkeypatch.setattr(loop.Objective, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite \(nan\) at step 13; the last good checkpoint "
                                               r"\(step 10\) is kept at"):
        train(_config(tmp_path, steps=30, eval_every=100, checkpoint_every=5), progress=False, plots=False)
    ckpt = ftrain.load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# Distributed: two CPU processes with gloo follow the single-process run
# ------------------------------------------------------------------------------------------------


def test_two_gloo_processes_match_one_process(tmp_path):
    ddp = _config(tmp_path / "ddp", steps=20, batch_size=64, eval_every=10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastdensity", "train", *_cli_args(ddp), "--out", ddp.out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("fastdensity train: realnvp") == 1  # only rank 0 speaks
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["device"] == "cpu x2"
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2  # steps 10 and 20, written once

    single = train(_config(tmp_path / "single", steps=20, batch_size=64, eval_every=10), progress=False,
                   plots=False)
    a = ftrain.load_checkpoint(str(tmp_path / "ddp"))["state_dict"]
    b = ftrain.load_checkpoint(str(tmp_path / "single"))["state_dict"]
    # Each rank averages its half of the same global batch and DDP averages the halves: the same
    # gradient up to summation order, so 20 Adam steps agree to float32 rounding.
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert metrics["test_nll"] == pytest.approx(single["test_nll"], abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_step():
    b1, b2 = ftrain.Batches(10, 4, seed=3), ftrain.Batches(10, 4, seed=3)
    steps = [b1.indices(s) for s in range(5)]
    assert all(torch.equal(b2.indices(s), steps[s]) for s in reversed(range(5)))  # any order, same batches
    flat = torch.cat(steps)  # 20 positions = two epochs of 10
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])  # a fresh permutation per epoch
    assert not torch.equal(ftrain.Batches(10, 4, seed=4).indices(0), steps[0])


def test_learning_rate_schedule():
    c = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100)
    assert ftrain.learning_rate(0, c) == pytest.approx(1e-5)
    assert ftrain.learning_rate(99, c) == pytest.approx(1e-3)
    assert ftrain.learning_rate(550, c) == pytest.approx(0.5e-3)
    assert ftrain.learning_rate(999, c) < 1e-7


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(str(path), lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half-written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_creates_files_as_open_would(tmp_path):
    """Mode 0o666 less the umask, like open(): a temporary file from mkstemp would leave 0o600 behind."""
    previous = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "shared.json"), lambda f: f.write(b"{}"))
        atomic_write(str(tmp_path / "shared.json"), lambda f: f.write(b"[]"))  # replacing, too
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "shared.json").read_bytes() == b"[]" and os.listdir(tmp_path) == ["shared.json"]


def test_resume_drops_a_log_line_cut_short(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 10, "valid_nll": 1.5}\n{"step": 20, "valid_nll": 1.4}\n{"step": 30, "val')
    assert run_directory.log_lines_through(str(path), 20) == ['{"step": 10, "valid_nll": 1.5}\n',
                                                        '{"step": 20, "valid_nll": 1.4}\n']
    assert len(run_directory.log_lines_through(str(path), 10)) == 1


def test_resolve_device_errors_are_clear():
    assert ftrain.resolve_device("cpu") == torch.device("cpu")
    assert ftrain.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'gpu' is not a device name PyTorch knows"):
        ftrain.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
            ftrain.resolve_device("cuda:0")


class _Exploit:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused(tmp_path):
    """weights_only loading: a pickle that would run code is rejected, not executed."""
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="not a readable fastdensity checkpoint"):
        ftrain.load_checkpoint(str(path))
    assert not marker.exists()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a fastdensity checkpoint"):
        ftrain.load_checkpoint(str(tmp_path / "other.pt"))


def test_model_and_data_must_fit():
    with pytest.raises(ValueError, match=r"pixelcnn models images .*8gaussians has shape \[2\]"):
        ftrain.model_args_for("pixelcnn", fdata.load_data("8gaussians"), {})
    with pytest.raises(ValueError, match="levels=5 does not match the data's 17 levels"):
        ftrain.model_args_for("pixelcnn", fdata.load_data("digits"), {"levels": 5})
    assert ftrain.model_args_for("pixelcnn", fdata.load_data("digits"), {}) == {"levels": 17}
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ftrain.resolve_defaults(TrainConfig(batch_size=0), fdata.load_data("digits"))


def test_evaluate_dequantized_is_reproducible():
    data = fdata.load_data("digits")
    torch.manual_seed(0)
    model = build_model("gmm", data.shape, components=4)
    pre = fdata.Dequantize(17, 0.01)
    model.initialize(pre.encode(data.train[:200])[0])
    a = ftrain.evaluate(model, data.test, data, pre, seed=5)
    b = ftrain.evaluate(model, data.test, data, pre, seed=5)
    c = ftrain.evaluate(model, data.test, data, pre, seed=6)
    assert a == b and a["nll"] != c["nll"] and a["examples"] == 180


# ------------------------------------------------------------------------------------------------
# GPU tier
# ------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("model,data,args", [("realnvp", "8gaussians", TINY_REALNVP),
                                             ("pixelcnn", "digits", {"hidden": 16, "num_blocks": 1}),
                                             ("glow", "digits", {"hidden": 16, "num_steps": 1})])
def test_gpu_training_run_and_cpu_evaluation_agree(tmp_path, model, data, args):
    metrics = train(_config(tmp_path, model=model, data=data, steps=30, batch_size=64, eval_every=30,
                            model_args=args, device="cuda"), progress=False, plots=True)
    assert metrics["device"].startswith("cuda") and math.isfinite(metrics["test_nll"])
    ckpt = ftrain.load_checkpoint(str(tmp_path))
    cpu_model, pre = ftrain.model_from_checkpoint(ckpt, "cpu")
    ds = fdata.load_data(data)
    on_cpu = ftrain.evaluate(cpu_model, ds.test, ds, pre, seed=ftrain.EVAL_SEED_OFFSET["test"])  # reference path, CPU
    assert on_cpu["nll"] == pytest.approx(metrics["test_nll"], rel=1e-4)
    assert (tmp_path / "samples.png").exists()
