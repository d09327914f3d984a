"""Checkpoints (minimoe/train.py): what is saved loads again, nothing else is ever replaced."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from minimoe.layer import MoEConfig
from minimoe.model import MoERegressor
from minimoe.train import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint


def _regressor() -> MoERegressor:
    torch.manual_seed(0)
    return MoERegressor(8, 2, MoEConfig(d_model=8, d_hidden=8, num_experts=4))


@pytest.mark.parametrize(
    "extra", [np.float32(0.5), np.int64(3), Path("runs/a"), {"nested": np.arange(2)}]
)
def test_an_extra_the_loader_refuses_is_refused_and_the_good_file_kept(tmp_path, extra):
    path = tmp_path / "model.pt"
    model = _regressor()
    save_checkpoint(model, path, step=3)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="extra step=.* would not load with weights_only=True"):
        save_checkpoint(model, path, step=extra)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    load_checkpoint(path)


def test_plain_extras_are_saved(tmp_path):
    save_checkpoint(_regressor(), tmp_path / "m.pt", step=3, note="x", lr=[1e-3, {"a": None}])
    assert load_checkpoint(tmp_path / "m.pt") is not None


@pytest.mark.parametrize("content", [b"my notes\n", None])  # a user's file; a folder
def test_a_file_that_is_not_a_checkpoint_is_never_replaced(tmp_path, content):
    path = tmp_path / "notes.pt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(FileExistsError, match="not a minimoe checkpoint: not replacing it"):
        save_checkpoint(_regressor(), path)
    assert path.is_dir() if content is None else path.read_bytes() == content


def test_a_checkpoint_is_replaced(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(_regressor(), path)
    model = _regressor()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_checkpoint(model, path)
    assert torch.equal(load_checkpoint(path).head.weight, model.head.weight)


def test_the_format_version_is_written_and_another_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(_regressor(), path)
    wrapped = torch.load(path, weights_only=True)
    assert CHECKPOINT_FORMAT == 1 and wrapped["format"] == 1
    torch.save(wrapped | {"format": 2}, path)
    with pytest.raises(ValueError, match="has format 2; this minimoe reads format 1"):
        load_checkpoint(path)


def test_a_loaded_model_is_in_eval_mode(tmp_path):
    save_checkpoint(_regressor().train(), tmp_path / "m.pt")
    model = load_checkpoint(tmp_path / "m.pt")
    assert not any(m.training for m in model.modules())


def test_an_unknown_kind_is_refused_by_name(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(_regressor(), path)
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    ckpt = torch.load(io.BytesIO(payload), weights_only=True) | {"kind": "classifier"}
    torch.save(ckpt, path)  # the format without checksums, which is read unverified
    with pytest.raises(ValueError, match="unknown kind 'classifier'.*transformer, regressor"):
        load_checkpoint(path)
