"""What a training run guarantees about its data, and how it says what went wrong (issue 14).

* Settings no run can use are refused before anything starts, in one line; a checkpoint is only ever
  written, and only ever called good, when every tensor in it is finite.
* One run at a time per output folder: the second is refused, naming the first; a lock left by a killed
  run is taken over.
* Checkpoints are checksummed and keep one previous copy: a flipped bit or a truncated file is detected,
  and loading falls back to the previous checkpoint, saying so; resuming from it is still bit-exact.
* A full disk is one line naming the file and the space, and the previous checkpoint stays.
* ``--resume --steps N`` re-plans the schedule, and says so; rank 0 failing to save stops every rank at
  once; a non-finite final NLL is written as standard JSON (null).
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from fastdensity import atomic_io, cli
from fastdensity import data as fdata
from fastdensity import training as ftrain
from fastdensity.training import TrainConfig, TrainingDiverged, checkpoint, integrity, loop, run_lock, train
from helpers import StopTraining, stop_training_at

TINY = {"hidden": 8, "num_layers": 2}
TINY_ARGS = ["--set", "hidden=8", "--set", "num_layers=2", "--no-progress", "--no-plots"]


def _config(out, **kw):
    base = dict(model="realnvp", data="checkerboard", steps=6, batch_size=32, eval_every=100, checkpoint_every=2,
                device="cpu", model_args=dict(TINY), out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(stderr: str, command: str = "train") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"fastdensity {command}: error:")]


def _flip_bit_in_largest_tensor(path) -> None:
    """Flip one bit in the stored bytes of the largest tensor of a ``torch.save`` file, as a failing disk
    or a bad copy would; the zip's own structure is untouched (torch reads records without a CRC check)."""
    with zipfile.ZipFile(path) as z:
        record = max((i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith(".pkl")),
                     key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))


# ------------------------------------------------------------------------------------------------
# 1. Unusable settings are refused up front; a checkpoint is good only if every tensor is finite
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], r"lr must be a finite number > 0; got inf"),
    (["--lr", "nan"], r"lr must be a finite number > 0; got nan"),
    (["--lr", "0"], r"lr must be a finite number > 0; got 0"),
    (["--grad-clip", "nan"], r"grad_clip must be > 0 \(inf for no clipping\); got nan"),
    (["--grad-clip", "-1"], r"grad_clip must be > 0"),
    (["--warmup-steps", "-5"], r"warmup_steps must be >= 0; got -5"),
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*63\); got -1"),
    (["--seed", str(2 ** 64)], r"seed must be in \[0, 2\*\*63\)"),
    (["--weight-decay", "nan"], r"weight_decay must be a finite number >= 0"),
    (["--device", "cpu:1"], r"device 'cpu:1' does not exist"),
    (["--device", "mps"], r"device 'mps' is not supported"),
    (["--device", "cuda:99"], r"device 'cuda:99' was asked for but"),
])
def test_unusable_settings_are_refused_before_anything_starts(tmp_path, capsys, monkeypatch, args, message):
    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the settings were checked")

    monkeypatch.setattr(fdata, "load_data", no_data)
    code, _, stderr = run_cli(capsys, "train", "--out", tmp_path / "run", *TINY_ARGS, *args)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("fastdensity train: error:"), stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "run").exists()  # nothing was created


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_evaluate_and_sample_refuse_a_seed_out_of_range(tmp_path, capsys, command):
    extra = ["--out", tmp_path / "s.npy"] if command == "sample" else []
    for seed in (-1, 2 ** 63):
        code, _, stderr = run_cli(capsys, command, tmp_path / "missing.pt", "--seed", seed, *extra)
        assert code == 2  # refused before the (missing) checkpoint is even looked for
        assert _error_lines(stderr, command) == [f"fastdensity {command}: error: --seed must be in [0, 2**63); "
                                                 f"got {seed}"]


def _poisoning_optimizer(monkeypatch, at_step: int):
    """The run's optimizer, but its ``at_step``-th step leaves a NaN in one weight (as a kernel bug or an
    overflowing update would) while that step's loss and gradient were finite."""
    make = loop.make_optimizer

    def make_poisoning(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        step, calls = optimizer.step, {"n": 0}

        def poisoning_step(*a, **k):
            out = step(*a, **k)
            calls["n"] += 1
            if calls["n"] == at_step:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
            return out

        optimizer.step = poisoning_step
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", make_poisoning)


def test_weights_that_became_non_finite_are_never_checkpointed(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _poisoning_optimizer(patch, at_step=1)
        with pytest.raises(TrainingDiverged, match=r"non-finite in step 1 \(1 of its \d+ tensors hold NaN or "
                                                   r"infinite values \(e.g. state_dict\..*\)\), so its checkpoint "
                                                   r"was not written; no checkpoint had been written yet"):
            train(_config(tmp_path / "first", checkpoint_every=1), progress=False, plots=False)
    assert not os.path.exists(tmp_path / "first" / "checkpoint.pt")

    # Good steps first: the checkpoints of steps 1 and 2 are written; step 3 ruins a weight.
    _poisoning_optimizer(monkeypatch, at_step=3)
    with pytest.raises(TrainingDiverged, match=r"non-finite in step 3 .*the last good checkpoint \(step 2\) is kept"):
        train(_config(tmp_path / "later", checkpoint_every=1), progress=False, plots=False)
    kept = ftrain.load_checkpoint(str(tmp_path / "later"))
    assert kept["step"] == 2
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values())


def test_a_checkpoint_holding_nan_is_not_good(tmp_path):
    """Even with a matching checksum (as an older version could write one), a NaN tensor makes it corrupt."""
    state = {"format": checkpoint.FORMAT, "step": 1, "state_dict": {"w": torch.tensor([1.0, float("nan")])}}
    state["checksum"] = {"algorithm": "sha256", "digest": integrity.payload_digest(state)}
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ftrain.CorruptCheckpoint, match=r"not a good checkpoint: 1 of its 1 tensors hold NaN or "
                                                       r"infinite values \(e.g. state_dict.w\)"):
        ftrain.load_checkpoint(str(tmp_path / "nan.pt"))


# ------------------------------------------------------------------------------------------------
# 2. One run per output folder
# ------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_busy_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "fastdensity", "train", "--steps", "1000000", "--batch-size",
                              "16", "--eval-every", "1000000", "--checkpoint-every", "50", "--out", out,
                              *TINY_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # the first run is under way, holding the lock
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        in_flight = out / ".tmp-checkpoint.pt-0123456789ab"  # as if the first run were writing it now
        in_flight.write_bytes(b"partial")

        code, _, stderr = run_cli(capsys, "train", "--steps", 2, "--out", out, *TINY_ARGS)
        assert code == 2
        [line] = _error_lines(stderr)
        assert line.startswith(f"fastdensity train: error: output folder {str(out)!r} is in use by another run: "
                               f"PID {first.pid} on {socket.gethostname()}, started ")
        assert line.endswith("; wait for it to end or choose another --out")
        assert in_flight.exists() and first.poll() is None  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()

    # kill -9 released nothing but the kernel's flock: the lock file (with the dead PID) is still there.
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid
    code, _, stderr = run_cli(capsys, "train", "--steps", 2, "--out", out, *TINY_ARGS)
    assert code == 0, stderr
    assert f"took over the lock of a run that ended without releasing it (PID {first.pid}" in stderr
    assert not (out / ".lock").exists() and not in_flight.exists()  # released; the dead run's temporary swept


def test_run_lock_by_pid_where_there_is_no_flock(tmp_path, monkeypatch):
    """Without flock (some network file systems) the recorded holder decides: a live process on this host
    holds the lock; a dead PID, or a live PID whose start time differs (reused), does not."""
    monkeypatch.setattr(run_lock, "fcntl", None)
    lock_path = tmp_path / run_lock.LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": run_lock._start_time(os.getpid()),
          "time": time.time()}
    lock_path.write_text(json.dumps(me))
    with pytest.raises(run_lock.OutputFolderInUse, match=rf"PID {os.getpid()} on .*if no run is using it, delete"):
        run_lock.RunLock(str(tmp_path)).acquire()

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale_records = [{**me, "pid": int(finished.stdout)}]  # a process that has ended
    if me["started"] is not None:  # Linux: our own PID, but recorded with another start time (PID reused)
        stale_records.append({**me, "started": "another-boot:123"})
    for stale in stale_records:
        lock_path.write_text(json.dumps(stale))
        lock = run_lock.RunLock(str(tmp_path))
        assert f"took over the lock of a run that ended without releasing it (PID {stale['pid']}" in lock.acquire()
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock_path.exists()


def test_run_lock_is_exclusive_within_one_process_too(tmp_path):
    with run_lock.RunLock(str(tmp_path)):
        with pytest.raises(run_lock.OutputFolderInUse, match=f"PID {os.getpid()}"):
            train(_config(tmp_path), progress=False, plots=False)
        assert not (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------
# 3. Checksums, and one previous checkpoint to fall back to
# ------------------------------------------------------------------------------------------------


def test_a_flipped_bit_is_detected_and_the_previous_checkpoint_is_used(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, stderr = run_cli(capsys, "train", "--data", "moons", "--steps", 4, "--checkpoint-every", 2,
                              "--out", run, *TINY_ARGS)
    assert code == 0, stderr
    code, stdout, _ = run_cli(capsys, "evaluate", run / "checkpoint.prev.pt", "--json")
    assert code == 0
    previous = json.loads(stdout)
    assert previous["step"] == 2

    _flip_bit_in_largest_tensor(run / "checkpoint.pt")
    code, stdout, stderr = run_cli(capsys, "evaluate", run, "--json")
    assert code == 0
    assert json.loads(stdout) == previous  # the previous checkpoint's figures, exactly
    assert (f"warning: {str(run / 'checkpoint.pt')!r} is corrupt: its contents do not match the checksum stored "
            f"when it was written") in stderr
    assert f"using the previous checkpoint {str(run / 'checkpoint.prev.pt')!r} (step 2) instead" in stderr

    _flip_bit_in_largest_tensor(run / "checkpoint.prev.pt")
    code, stdout, stderr = run_cli(capsys, "evaluate", run, "--json")
    assert code == 2 and stdout == ""
    assert len(_error_lines(stderr, "evaluate")) == 1 and "the previous checkpoint is no better" in stderr


def test_a_run_with_a_single_corrupt_checkpoint_is_refused(tmp_path, capsys):
    """No previous copy to fall back to: the corrupt file is an error, never a silently wrong NLL."""
    assert run_cli(capsys, "train", "--data", "moons", "--steps", 2, "--checkpoint-every", 2, "--out", tmp_path,
                   *TINY_ARGS)[0] == 0
    assert not (tmp_path / "checkpoint.prev.pt").exists()
    _flip_bit_in_largest_tensor(tmp_path / "checkpoint.pt")
    for command in (["evaluate", tmp_path], ["sample", tmp_path, "--out", tmp_path / "s.npy"]):
        code, stdout, stderr = run_cli(capsys, *command)
        assert code == 2 and stdout == ""
        assert _error_lines(stderr, command[0]) == [
            f"fastdensity {command[0]}: error: {str(tmp_path / 'checkpoint.pt')!r} is corrupt: its contents do not "
            "match the checksum stored when it was written (a changed bit, or an edited file)"]


def test_resume_from_the_previous_checkpoint_when_the_latest_is_truncated_is_still_bit_exact(tmp_path):
    settings = dict(steps=10, checkpoint_every=3, eval_every=3)
    full = train(_config(tmp_path / "full", **settings), progress=False, plots=False)

    with pytest.MonkeyPatch.context() as patch:
        stop_training_at(patch, 8)
        with pytest.raises(StopTraining):
            train(_config(tmp_path / "cut", **settings), progress=False, plots=False)
    latest = tmp_path / "cut" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # the latest (step 6), truncated

    notes = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "log", lambda message, world: notes.append(message))
        resumed = train(TrainConfig(out=str(tmp_path / "cut"), device="cpu"), resume=True, progress=False,
                        plots=False)
    warning = [n for n in notes if n.startswith("warning:")]
    assert len(warning) == 1 and "is not a readable fastdensity checkpoint" in warning[0]
    assert "using the previous checkpoint" in warning[0] and "(step 3) instead" in warning[0]
    assert "resuming at step 3" in "\n".join(notes)
    a = ftrain.load_checkpoint(str(tmp_path / "cut"))
    b = ftrain.load_checkpoint(str(tmp_path / "full"))
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    assert resumed["test_nll"] == full["test_nll"]
    log = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "log.jsonl")]
    assert log == [3, 6, 9, 10]  # step 6's line, written after the kept checkpoint, was redone once


def test_the_checksum_covers_every_value_and_ignores_key_order():
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "step": 3, "betas": (0.9, 0.999), "name": "x",
             "none": None, "flag": True, "nested": {"a": [1, 2.5]}}
    digest = integrity.payload_digest(state)
    assert integrity.payload_digest(dict(reversed(list(state.items())))) == digest
    assert integrity.payload_digest({**state, "w": state["w"].t().contiguous().t()}) == digest  # layout-free
    flipped = state["w"].clone()
    flipped.view(torch.int32)[1, 1] ^= 1  # the lowest mantissa bit of one element
    changed = [{**state, "w": flipped}, {**state, "w": state["w"].view(3, 2)}, {**state, "w": state["w"].double()},
               {**state, "step": 4}, {**state, "betas": [0.9, 0.999]}, {**state, "flag": 1},
               {**state, "nested": {"a": [1, 2.5000000000000004]}}, {**state, "name": "y"}, {**state, "none": 0}]
    for other in changed:
        assert integrity.payload_digest(other) != digest, other


def test_atomic_write_verifies_before_it_replaces_and_keeps_one_previous_copy(tmp_path):
    path, previous = tmp_path / "f.bin", tmp_path / "f.prev.bin"
    atomic_io.atomic_write(path, lambda f: f.write(b"one"), keep_previous=previous)
    assert path.read_bytes() == b"one" and not previous.exists()
    atomic_io.atomic_write(path, lambda f: f.write(b"two"), keep_previous=previous)
    assert (path.read_bytes(), previous.read_bytes()) == (b"two", b"one")

    def reject(written):
        assert open(written, "rb").read() == b"bad"  # verify reads the new file, before it has the name
        raise ValueError("read back differently")

    with pytest.raises(ValueError, match="read back differently"):
        atomic_io.atomic_write(path, lambda f: f.write(b"bad"), verify=reject, keep_previous=previous)
    assert (path.read_bytes(), previous.read_bytes()) == (b"two", b"one")  # nothing rotated
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "f.prev.bin"]  # no temporary left


# ------------------------------------------------------------------------------------------------
# 4. A full disk: one line, the previous checkpoint kept
# ------------------------------------------------------------------------------------------------


class _FillsUp(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes past that fail with ENOSPC, like the real thing."""

    def __init__(self, real, room):
        self.real, self.room = real, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.real.write(b)

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    opened = atomic_io._open_exclusive
    checkpoints = {"n": 0}

    def disk_fills_up_at_the_third_checkpoint(path):
        f = opened(path)
        if os.path.basename(path).startswith(".tmp-checkpoint.pt-"):
            checkpoints["n"] += 1
            if checkpoints["n"] == 3:
                return io.BufferedWriter(_FillsUp(f, room=1000))
        return f

    monkeypatch.setattr(atomic_io, "_open_exclusive", disk_fills_up_at_the_third_checkpoint)
    code, _, stderr = run_cli(capsys, "train", "--steps", 8, "--checkpoint-every", 2, "--eval-every", 100,
                              "--out", tmp_path, *TINY_ARGS)
    assert code == 1
    assert "Traceback" not in stderr and "During handling" not in stderr
    [line] = _error_lines(stderr)
    ckpt = str(tmp_path / "checkpoint.pt")
    assert re.fullmatch(rf"fastdensity train: error: no space left on the device writing {re.escape(ckpt)} \(it needs "
                        rf"about [0-9.]+ kB; [0-9.]+ [kMGT]?B free on that file system\); the last good checkpoint "
                        rf"\(step 4\) is kept at {re.escape(ckpt)}", line), line
    assert ftrain.load_checkpoint(str(tmp_path))["step"] == 4  # verified: checksum and finite tensors
    assert ftrain.load_checkpoint(str(tmp_path / "checkpoint.prev.pt"))["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]  # no temporary, no metrics


# ------------------------------------------------------------------------------------------------
# 10. Unclear errors: model options, --out
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--set", "hidden=abc"], r"hidden"),
    (["--set", "hidden=1e9"], r"hidden=1000000000.*memory"),
    (["--out", "{tmp}/a-file"], r"--out '.*a-file' is an existing file; the output must be a folder"),
    (["--out", "{tmp}/a-file/run"], r"--out '.*a-file/run' cannot be a folder: '.*a-file' is a file"),
])
def test_unclear_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    argv = ["train", "--steps", 2, "--no-progress", "--no-plots", "--out", tmp_path / "run",
            *[str(a).format(tmp=tmp_path) for a in args]]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2
    [line] = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("fastdensity train: error:") and re.search(message, line), stderr
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_model_too_big_to_allocate_is_one_line(tmp_path, capsys, monkeypatch):
    """What the models' own size check cannot foresee (memory others use, a smaller GPU): the allocator's
    failure, said in one line with the size it asked for."""
    from fastdensity.training import model_setup

    def allocator_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(model_setup, "build_model", allocator_fails)
    code, _, stderr = run_cli(capsys, "train", "--steps", 2, "--out", tmp_path, *TINY_ARGS)
    assert code == 2
    assert _error_lines(stderr) == [
        "fastdensity train: error: realnvp with hidden=8, num_layers=2 does not fit in the memory available on cpu: "
        "one of its tensors alone needs 4.0 TB; choose smaller sizes"]


# ------------------------------------------------------------------------------------------------
# 12. The schedule on --resume --steps N; rank 0 failing; a NaN final NLL
# ------------------------------------------------------------------------------------------------


def test_resume_with_other_steps_replans_the_schedule_and_says_so(tmp_path, capsys):
    assert run_cli(capsys, "train", "--steps", 10, "--warmup-steps", 2, "--eval-every", 1, "--out", tmp_path,
                   *TINY_ARGS)[0] == 0
    code, _, stderr = run_cli(capsys, "train", "--resume", "--steps", 20, "--eval-every", 1, "--out", tmp_path,
                              "--no-progress", "--no-plots")
    assert code == 0, stderr
    old_plan, new_plan = _config(tmp_path, steps=10, warmup_steps=2, lr=2e-3), _config(tmp_path, steps=20,
                                                                                       warmup_steps=2, lr=2e-3)
    assert ftrain.learning_rate(10, old_plan) == 0.0  # the finished plan had decayed to nothing
    assert (f"extending the run from 10 to 20 steps: the cosine schedule is re-planned to end at step 20, so the "
            f"learning rate of step 11 is {ftrain.learning_rate(10, new_plan):.4g} (the 10-step plan had 0)") in stderr
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    # Steps 1-10 ran on the 10-step plan, steps 11-20 on the 20-step one: the schedule is the current plan's.
    assert [r["lr"] for r in log] == ([ftrain.learning_rate(s, old_plan) for s in range(10)]
                                      + [ftrain.learning_rate(s, new_plan) for s in range(10, 20)])

    code, _, stderr = run_cli(capsys, "train", "--resume", "--steps", 5, "--out", tmp_path, "--no-progress")
    assert code == 2 and "cannot resume with steps=5: the checkpoint is at step 20 already" in stderr


_RANK_SCRIPT = textwrap.dedent("""
    import datetime, errno, os, sys
    import torch.distributed as dist
    from fastdensity import cli
    from fastdensity.training import loop

    rank = int(os.environ["RANK"])
    # The collective timeout is long on purpose: before the fix, rank 1 waited this long for rank 0.
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    if rank == 0:
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        loop.save_checkpoint = disk_full
    code = cli.main(["train", "--steps", "4", "--batch-size", "16", "--checkpoint-every", "2", "--device", "cpu",
                     "--out", sys.argv[2], "--set", "hidden=8", "--set", "num_layers=2", "--no-progress",
                     "--no-plots"])
    dist.destroy_process_group()  # what setup_distributed's World does for the group it starts
    sys.exit(code)
""")


def test_rank_0_failing_to_save_stops_every_rank_at_once(tmp_path):
    """Two gloo processes started by hand (torchrun would kill the other rank itself and hide the bug)."""
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path / "store"), str(tmp_path / "run")],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]  # far below the 600 s collective timeout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [1, 1], errors
    assert "fastdensity train: error: [Errno 28] No space left on device" in errors[0]
    assert ("fastdensity train: error: rank 1: stopping because rank 0 failed while saving the checkpoint of step 2"
            in errors[1]), errors[1]
    assert "Traceback" not in errors[0] + errors[1]


def test_a_non_finite_final_nll_is_written_as_standard_json(tmp_path, capsys, monkeypatch):
    scored = loop.evaluate

    def nan_on_test(model, x, data, *args, **kwargs):
        result = scored(model, x, data, *args, **kwargs)
        return dict(result, nll=float("nan"), bits_per_dim=float("nan")) if x is data.test else result

    monkeypatch.setattr(loop, "evaluate", nan_on_test)
    code, stdout, stderr = run_cli(capsys, "train", "--steps", 2, "--out", tmp_path, "--json", *TINY_ARGS)
    assert code == 0, stderr

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    for metrics in (strict((tmp_path / "metrics.json").read_text()), strict(stdout)):
        assert metrics["test_nll"] is None and metrics["bits_per_dim"] is None
        assert metrics["non_finite"] == ["test_nll", "bits_per_dim"] and math.isfinite(metrics["true_nll"])
    assert "warning: the test NLL is not finite (nan)" in stderr
