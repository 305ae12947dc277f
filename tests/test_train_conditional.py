"""Class-conditional training (``fastdensity train --conditional``): labels loaded with the data and split
with it, the context each kind of model takes, training / evaluation / sampling given labels, resume, and
the errors for data without labels or models that cannot be conditioned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdensity import data as fdata
from fastdensity.commands.evaluate import evaluate_checkpoint
from fastdensity.commands.sample import sample_checkpoint
from fastdensity.training import (TrainConfig, evaluate, label_context, load_checkpoint, model_from_checkpoint,
                                  sample_labels, train)

from helpers import StopTraining, stop_training_at

sklearn = pytest.importorskip("sklearn")

TINY_TARFLOW = {"width": 8, "heads": 2, "num_blocks": 2, "layers_per_block": 1}


def test_digits_labels_follow_their_images_through_the_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    ds = fdata.load_data("digits", split_seed=3)
    assert ds.num_classes == 10 and [len(t) for t in ds.labels] == [len(ds.train), len(ds.valid), len(ds.test)]
    # every image of every split carries the label sklearn gives that image
    images = torch.from_numpy(digits.images.astype(np.uint8)).flatten(1)
    for split in ("train", "valid", "test"):
        x = getattr(ds, split).flatten(1)
        index = (x[:, None, :] == images[None]).all(-1).float().argmax(1)  # each row's original position
        torch.testing.assert_close(ds.split_labels(split), torch.from_numpy(digits.target)[index])


def _labelled(n=40, d=3, seed=0):
    """Vectors whose first feature is their label (so a mismatched split of labels shows)."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, 4, n)
    x = g.normal(size=(n, d)).astype(np.float32)
    x[:, 0] = labels
    return x, labels


@pytest.mark.parametrize("layout", ["one array", "train/valid/test", "train and test"])
def test_file_labels_are_split_with_their_examples(tmp_path, layout):
    x, labels = _labelled()
    path = tmp_path / "data.npz"
    if layout == "one array":
        np.savez(path, data=x, labels=labels)
    elif layout == "train/valid/test":
        np.savez(path, train=x[:30], valid=x[30:35], test=x[35:], train_labels=labels[:30], valid_labels=labels[30:35],
                 test_labels=labels[35:])
    else:  # valid carved out of train, labels with it
        np.savez(path, train=x[:35], test=x[35:], train_labels=labels[:35], test_labels=labels[35:])
    ds = fdata.load_data(str(path))
    assert ds.num_classes == 4
    for split in ("train", "valid", "test"):
        torch.testing.assert_close(ds.split_labels(split).float(), getattr(ds, split)[:, 0])


@pytest.mark.parametrize("arrays,message", [
    (lambda x, y: {"data": x, "labels": y[:-1]}, "39 labels for 40 examples"),
    (lambda x, y: {"data": x, "labels": y.astype(np.float32)}, "integers of shape"),
    (lambda x, y: {"data": x, "labels": -y - 1}, "negative label"),
    (lambda x, y: {"train": x, "test": x, "train_labels": y}, "labels for some splits only"),
    (lambda x, y: {"data": x, "other": x, "labels": y}, "give it one array"),
])
def test_bad_labels_name_the_array(tmp_path, arrays, message):
    x, labels = _labelled()
    path = tmp_path / "data.npz"
    np.savez(path, **arrays(x, labels))
    with pytest.raises(ValueError, match=message):
        fdata.load_data(str(path))


def test_conditioning_on_the_true_label_beats_a_wrong_one(tmp_path):
    """Not vacuous: a short conditional MAF run on digits scores the test set far better given each image's
    own label than given a wrong one (measured: 2.23 against 3.33 bits/dim)."""
    config = TrainConfig(model="maf", data="digits", steps=300, eval_every=300, device="cpu", out=str(tmp_path),
                         model_args={"hidden": 64, "num_layers": 3}, conditional=True)
    metrics = train(config, progress=False, plots=False)
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["config"]["conditional"] and ckpt["model"]["args"]["context_features"] == 10
    model, preprocess = model_from_checkpoint(ckpt)
    ds = fdata.load_data("digits")
    labels = ds.split_labels("test")
    good = evaluate(model, ds.test, ds, preprocess, seed=5, labels=labels)["bits_per_dim"]
    wrong = evaluate(model, ds.test, ds, preprocess, seed=5, labels=(labels + 1) % 10)["bits_per_dim"]
    assert wrong - good > 0.3, (good, wrong)
    # fastdensity evaluate scores a conditional checkpoint given the labels, reproducing training's figure
    assert evaluate_checkpoint(str(tmp_path), device="cpu")["bits_per_dim"] == pytest.approx(metrics["bits_per_dim"])


def test_tarflow_takes_labels_and_samples_by_class(tmp_path):
    config = TrainConfig(model="tarflow", data="digits", steps=4, batch_size=16, eval_every=4, device="cpu",
                         out=str(tmp_path / "run"), model_args=TINY_TARFLOW, conditional=True)
    train(config, progress=False, plots=True)
    assert (tmp_path / "run" / "samples.png").exists()
    model, _ = model_from_checkpoint(load_checkpoint(str(tmp_path / "run")))
    assert model.num_classes == 10
    assert label_context(model, torch.tensor([3, 1])).dtype == torch.int64  # labels, not one-hot rows
    out = sample_checkpoint(str(tmp_path / "run"), 5, str(tmp_path / "s.npy"), seed=1, label=7)
    assert np.load(out).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match=r"--label must be a class in 0\.\.9"):
        sample_checkpoint(str(tmp_path / "run"), 5, str(tmp_path / "s.npy"), label=10)


def test_sample_labels_go_class_by_class():
    assert sample_labels(10, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sample_labels(3, 10).tolist() == [0, 3, 6]


def test_resumed_conditional_run_is_bit_exact(tmp_path, monkeypatch):
    """Stopped after its step-3 checkpoint and resumed, a conditional run ends bit for bit where the
    uninterrupted one does: the labels of every batch are a function of the step, like the batch."""
    options = dict(model="maf", data="digits", steps=6, batch_size=32, eval_every=3, device="cpu",
                   model_args={"hidden": 16, "num_layers": 2}, conditional=True)
    train(TrainConfig(out=str(tmp_path / "whole"), **options), progress=False, plots=False)
    with monkeypatch.context() as patch:
        stop_training_at(patch, 5)
        with pytest.raises(StopTraining):
            train(TrainConfig(out=str(tmp_path / "cut"), **options), progress=False, plots=False)
    assert load_checkpoint(str(tmp_path / "cut"))["step"] == 3
    train(TrainConfig(out=str(tmp_path / "cut"), device="cpu"), resume=True, progress=False, plots=False)
    whole = load_checkpoint(str(tmp_path / "whole"))["state_dict"]
    cut = load_checkpoint(str(tmp_path / "cut"))["state_dict"]
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize("model,data,args,message", [
    ("pixelcnn", "digits", {}, "pixelcnn cannot be conditioned on class labels; models that can: .*tarflow"),
    ("realnvp", "8gaussians", {}, "8gaussians has no labels"),
    ("tarflow", "digits", {"num_classes": 5}, "num_classes=5 does not match the data's 10 classes"),
])
def test_conditional_runs_that_cannot_start_say_why(tmp_path, model, data, args, message):
    config = TrainConfig(model=model, data=data, steps=1, device="cpu", out=str(tmp_path), model_args=args,
                         conditional=True)
    with pytest.raises(ValueError, match=message):
        train(config, progress=False, plots=False)


def test_label_is_refused_for_an_unconditional_checkpoint(tmp_path):
    train(TrainConfig(model="maf", data="digits", steps=1, device="cpu", out=str(tmp_path),
                      model_args={"hidden": 8, "num_layers": 1}), progress=False, plots=False)
    with pytest.raises(ValueError, match="--label is for checkpoints trained with --conditional"):
        sample_checkpoint(str(tmp_path), 2, str(tmp_path / "s.npy"), label=1)
