"""The tiny transformer, the recorder, training, checkpoints and the command line."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
import torch

from minimoe import analysis, plots
from minimoe.__main__ import main as cli
from minimoe.data import lm_batches, make_toy_task, toy_batches
from minimoe.layer import MoE, MoEConfig, moe_layers
from minimoe.model import ModelConfig, MoERegressor, TinyTransformer
from minimoe.routing import TopP
from minimoe.train import TrainConfig, load_checkpoint, save_checkpoint, train

matplotlib.use("Agg")


def _tiny(**moe) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(
        ModelConfig(block_size=32, moe=MoEConfig(d_model=32, d_hidden=32, num_experts=4, **moe))
    )


def test_model_trains_loss_falls(corpus):
    model = _tiny()
    hist = train(model, lm_batches(corpus, 8, 32), TrainConfig(steps=40, lr=1e-2, progress=False))
    assert sum(hist.loss[-5:]) / 5 < hist.loss[0] - 1.0
    assert hist.experts_per_token[-1] == [2.0, 2.0]


def test_same_seed_same_numbers(corpus):
    runs = [
        train(_tiny(), lm_batches(corpus, 4, 32), TrainConfig(steps=5, progress=False)).loss
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_shapes_heads_and_every_other_layer():
    cfg = ModelConfig(
        n_layers=4,
        moe_every=2,
        num_classes=3,
        block_size=16,
        moe=MoEConfig(d_model=32, d_hidden=32),
    )
    model = TinyTransformer(cfg)
    assert len(moe_layers(model)) == 2
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.item() > 0 and len(out.layers) == 2
    lm = model(idx, targets=idx)
    assert lm.logits.shape == (2, 16, 256)
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.randint(0, 256, (1, 17)))
    with pytest.raises(ValueError, match="n_heads=5"):
        ModelConfig(n_heads=5, moe=MoEConfig(d_model=32))


def test_recorder_sees_every_token_and_changes_nothing():
    model = _tiny().eval()
    idx = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        before = model(idx).logits
        with analysis.RoutingRecorder(model) as rec:
            during = model(idx).logits
        after = model(idx).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert len(rec) == 2 and rec.routing(1).num_tokens == 96
    assert not any(m._forward_hooks for m in moe_layers(model))  # hooks removed on exit
    with pytest.raises(ValueError, match="no MoE layer"):
        analysis.RoutingRecorder(torch.nn.Linear(2, 2))


def test_checkpoint_roundtrip(tmp_path):
    model = _tiny(router=TopP()).eval()
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, loaded(idx).logits)
    assert loaded.config.moe.router == TopP()

    toy = MoERegressor(16, 8, MoEConfig(d_model=16, num_experts=4)).eval()
    save_checkpoint(toy, tmp_path / "toy.pt")
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(toy(x).logits, load_checkpoint(tmp_path / "toy.pt")(x).logits)


def test_shared_expert_and_sequence_balance_train_and_checkpoint(corpus, tmp_path):
    model = _tiny(shared_hidden=16, shared_gate=True, seq_balance_coef=1e-2)
    shared = moe_layers(model)[0].shared.gate_up.detach().clone()
    hist = train(model, lm_batches(corpus, 4, 32), TrainConfig(steps=3, progress=False))
    assert all(np.isfinite(hist.loss)) and not torch.equal(
        moe_layers(model)[0].shared.gate_up, shared
    )
    save_checkpoint(model.eval(), tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.moe == model.config.moe
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(idx).logits, loaded(idx).logits)


def test_history_max_violation_is_each_steps_maxvio_per_layer(corpus):
    loads = []

    def record(step, model, out) -> None:
        loads.append([m.stats.tokens_per_expert.tolist() for m in out.layers])

    hist = train(
        _tiny(), lm_batches(corpus, 4, 32), TrainConfig(steps=3, progress=False), callback=record
    )
    # MaxVio_batch = (max_i load_i - mean load) / mean load, by hand from each step's counts
    by_hand = [[(max(c) - sum(c) / len(c)) / (sum(c) / len(c)) for c in step] for step in loads]
    assert len(hist.max_violation) == 3 and len(hist.max_violation[0]) == 2
    assert np.allclose(hist.max_violation, by_hand) and max(max(hist.max_violation)) > 0


def test_toy_regressor_learns_and_freeze_router():
    task = make_toy_task(1024, seed=0)
    model = MoERegressor(16, 8, MoEConfig(d_model=16, d_hidden=32, num_experts=4))
    gate_before = model.moe.gate.weight.clone()
    hist = train(
        model,
        toy_batches(task, 64),
        TrainConfig(steps=30, lr=1e-2, freeze_router=True, progress=False),
    )
    assert torch.equal(model.moe.gate.weight, gate_before)  # router frozen
    assert sum(hist.loss[-5:]) / 5 < hist.loss[0]


def test_capacity_report_counts_drops():
    logits = torch.tensor([[5.0, 0, 0, 0]] * 6 + [[0, 5.0, 0, 0]] * 2)  # 6 tokens want expert 0
    rep = analysis.capacity_report(logits, k=1, capacity_factor=1.0)  # capacity ceil(8/4) = 2
    assert rep.capacity == 2
    assert rep.tokens_per_expert.tolist() == [6, 2, 0, 0]
    assert rep.kept_per_expert.tolist() == [2, 2, 0, 0]
    assert rep.dropped_pairs == 4 and rep.dropped_tokens == 4
    assert analysis.capacity_report(logits, 1, None).dropped_pairs == 0


def test_experts_per_token_tracker_by_group(corpus):
    model = _tiny(router=TopP(p=0.5))
    probe = lm_batches(corpus, 2, 32)(torch.Generator().manual_seed(0))
    groups = torch.arange(64) % 2
    tracker = analysis.ExpertsPerTokenTracker(probe, every=2, groups=groups)
    train(model, lm_batches(corpus, 4, 32), TrainConfig(steps=4, progress=False), callback=tracker)
    assert tracker.steps == [2, 4]
    assert len(tracker.per_layer[0]) == 2 and set(tracker.per_group[0][0]) == {0, 1}
    assert all(1.0 <= v <= 4.0 for v in tracker.per_layer[-1])


def test_plots_and_widget_build():
    r = MoE(MoEConfig(d_model=16, num_experts=4))(torch.randn(20, 16)).routing
    assert plots.plot_expert_load({"a": r}).get_title() == "Load per expert"
    assert plots.plot_routing_heatmap(r, num_tokens=10).get_images()
    assert plots.smooth([1.0, 3.0, 5.0], window=2).tolist() == [1.0, 2.0, 4.0]
    from minimoe.widgets import capacity_explorer

    assert len(capacity_explorer(r.logits).children) == 2


def test_cli_train_writes_summary(tmp_path, capsys):
    cli(
        [
            *"train --steps 3 --batch-size 4 --block-size 16 --d-model 32 --experts 4 --capacity-factor 1.0 --no-progress --out".split(),
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert "experts/token" in printed and "dropped" in printed and "maxvio" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["experts_per_token"]) == 2 and summary["dropped_pairs_in_training"] >= 0
    for maxvio, load in zip(summary["maxvio"], summary["load_per_expert"], strict=True):
        # MaxVio over the probe batch: scale-free, so the printed load shares give it too
        assert maxvio == pytest.approx((max(load) - 1 / 4) * 4, abs=0.01)
    assert (tmp_path / "model.pt").exists()


# ---- mixed precision ----------------------------------------------------------------------


def test_bfloat16_autocast_trains_on_cpu_with_a_float32_router(corpus):
    model = _tiny()
    seen = []

    def callback(step, model, out):
        seen.append({m.routing.logits.dtype for m in out.layers})

    hist = train(
        model,
        lm_batches(corpus, 8, 32),
        TrainConfig(steps=40, lr=1e-2, autocast="bfloat16", progress=False),
        callback=callback,
    )
    assert seen[0] == {torch.float32}, "router logits must stay float32 under autocast"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay float32"
    assert sum(hist.loss[-5:]) / 5 < hist.loss[0] - 1.0


@pytest.mark.parametrize("value", ["bf16", "float64", torch.bfloat16])
def test_unknown_autocast_dtype_is_refused(value):
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast=value)


def test_cli_train_with_bfloat16_autocast(tmp_path, capsys):
    cli(
        [
            *"train --steps 3 --batch-size 4 --block-size 16 --d-model 32 --experts 4 --autocast bfloat16 --no-progress --out".split(),
            str(tmp_path),
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["autocast"] == "bfloat16" and np.isfinite(summary["val_loss"])


def test_cli_refuses_float16_with_expert_parallel():
    with pytest.raises(ValueError, match="float16"):
        cli(
            ["train", "--steps", "1", "--expert-parallel", "--autocast", "float16", "--no-progress"]
        )


def test_float16_autocast_needs_cuda(corpus):
    with pytest.raises(ValueError, match="float16.*cpu"):
        train(
            _tiny(),
            lm_batches(corpus, 4, 32),
            TrainConfig(steps=1, autocast="float16", progress=False),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_trains_on_cuda(corpus, dtype):
    model = _tiny().to("cuda")
    hist = train(
        model,
        lm_batches(corpus, 8, 32),
        TrainConfig(steps=40, lr=1e-2, autocast=dtype, progress=False),
    )
    assert sum(hist.loss[-5:]) / 5 < hist.loss[0] - 1.0


def test_paired_timing_ratio_is_the_median_of_per_round_ratios():
    from course.common import Timings, interleaved

    t = Timings({"a": [2.0, 4.0, 30.0], "b": [1.0, 1.0, 10.0]})
    assert t["a"] == 4.0 and t.ratio("a", "b") == 3.0  # per round 2, 4, 3; medians would say 4
    calls = []
    timed = interleaved(
        {"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=3, warmup=1
    )
    assert calls == ["x", "y", "y", "x", "x", "y", "y", "x"]  # alternating order, warm-up untimed
    assert all(len(v) == 3 for v in timed.rounds.values())
    with pytest.raises(ValueError, match="'z'"):
        t.ratio("a", "z")


# ---- argument checks, non-finite losses, safe checkpoints --------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": -1}, ValueError, "steps must be >= 0, got steps=-1"),
        ({"steps": 2.0}, TypeError, "steps must be an int, got steps=2.0"),
        ({"steps": True}, TypeError, "steps=True"),
        ({"lr": 0.0}, ValueError, "lr must be finite and > 0, got lr=0.0"),
        ({"lr": float("nan")}, ValueError, "lr=nan"),
        ({"lr": "0.1"}, TypeError, "lr='0.1'"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay=-0.1"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay=inf"),
        ({"grad_clip": -1.0}, ValueError, "grad_clip must be finite and >= 0, got grad_clip=-1.0"),
        ({"grad_clip": float("inf")}, ValueError, "grad_clip=inf"),
        ({"seed": 1.5}, TypeError, "seed=1.5"),
        ({"seed": -1}, ValueError, "seed=-1"),
        ({"eval_every": False}, TypeError, "eval_every=False"),
        ({"eval_every": -5}, ValueError, "eval_every=-5"),
        ({"lr_schedule": "linear"}, ValueError, "lr_schedule='linear'"),
    ],
)
def test_train_config_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)


def test_cosine_schedule_decays_the_learning_rate_to_zero_by_the_last_step(monkeypatch):
    task = make_toy_task(256, seed=0)
    model = MoERegressor(task.x.shape[1], task.y.shape[1], MoEConfig(d_model=task.x.shape[1]))
    seen, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):  # the learning rate each optimizer step uses
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    train(
        model,
        toy_batches(task, 32),
        TrainConfig(steps=4, lr=0.1, lr_schedule="cosine", progress=False),
    )
    # step s trains at 0.1 * (1 + cos(pi (s - 1) / 4)) / 2
    assert seen == pytest.approx([0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2])


def test_train_config_is_frozen():
    import dataclasses

    config = TrainConfig(steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5
    assert dataclasses.replace(config, grad_clip=0.0).grad_clip == 0.0


def _toy_batches_with_nan_at(call: int):
    task = make_toy_task(256, seed=0)
    batches, calls = toy_batches(task, 32), [0]

    def get_batch(g):
        calls[0] += 1
        batch = batches(g)
        if calls[0] == call:
            batch["y"] = torch.full_like(batch["y"], float("nan"))
        return batch

    return get_batch


@pytest.mark.parametrize("steps", [5, 3])  # the bad batch in the middle, and at the last step
def test_nan_task_loss_stops_training(steps):
    model = MoERegressor(16, 8, MoEConfig(d_model=16, d_hidden=32, num_experts=4))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(lr=0.003"):
        train(model, _toy_batches_with_nan_at(3), TrainConfig(steps=steps, progress=False))


class _InfAuxLoss(torch.nn.Module):
    """A finite task loss, and an aux loss that is inf at the second call."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = torch.nn.Parameter(torch.ones(4)), 0

    def forward(self, x):
        from types import SimpleNamespace

        self.calls += 1
        aux = torch.tensor(float("inf") if self.calls == 2 else 0.0)
        return SimpleNamespace(loss=(self.w * x).pow(2).mean(), aux_loss=aux, layers=[])


def test_inf_aux_loss_stops_training():
    with pytest.raises(FloatingPointError, match=r"loss is inf at step 2 \(lr=0.01.*aux loss inf"):
        train(
            _InfAuxLoss(),
            lambda g: {"x": torch.randn(8, 4, generator=g)},
            TrainConfig(steps=4, lr=0.01, progress=False),
        )


def _saved_regressor(path):
    model = MoERegressor(16, 8, MoEConfig(d_model=16, num_experts=4)).eval()
    save_checkpoint(model, path)
    return model


def test_checkpoint_with_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "toy.pt"
    _saved_regressor(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{path}.*corrupt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "toy.pt"
    _saved_regressor(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{path} cannot be read \\(corrupt or truncated"):
        load_checkpoint(path)


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle this extra")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import io

    path = tmp_path / "toy.pt"
    model = _saved_regressor(path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot pickle this extra"):
        save_checkpoint(model, path, note=_Unpicklable())
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if not isinstance(f, io.BytesIO):  # the write to disk: cut it short
            f.seek(10)
            f.truncate()
            raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy.pt"]  # no temporary file left
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(x).logits, model(x).logits)


def test_checkpoint_without_checksum_still_loads(tmp_path):
    path = tmp_path / "toy.pt"
    model = _saved_regressor(path)
    # the format before checksums (data/gw_pretrained.pt): the checkpoint dict torch.saved directly
    payload = torch.load(path, weights_only=True)["payload"]
    (tmp_path / "old.pt").write_bytes(payload.numpy().tobytes())
    assert "kind" in torch.load(tmp_path / "old.pt", weights_only=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "old.pt")(x).logits, model(x).logits)


@pytest.mark.parametrize(
    "idx, error, text",
    [
        (torch.full((2, 4), 256), ValueError, "token id 256 is outside the vocabulary [0, 256)"),
        (torch.full((2, 4), -1), ValueError, "token id -1"),
        (torch.zeros(0, 4, dtype=torch.long), ValueError, "empty batch"),
        (torch.zeros(2, 4), TypeError, "integer token ids"),
    ],
)
def test_transformer_refuses_bad_token_ids(idx, error, text):
    with pytest.raises(error, match=re.escape(text)):
        _tiny()(idx)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_layers", 0),
        ("n_heads", 2.0),
        ("dropout", 1.5),
        ("num_classes", -1),
        ("moe", {"router": "bogus"}),
    ],
)
def test_model_config_refuses_bad_values(field, value):
    with pytest.raises(
        (ValueError, TypeError), match=re.escape(field) if field != "moe" else "bogus"
    ):
        ModelConfig(**{field: value})


def test_schedule_steps_trains_the_first_steps_of_a_longer_schedule(monkeypatch):
    task = make_toy_task(256, seed=0)
    model = MoERegressor(task.x.shape[1], task.y.shape[1], MoEConfig(d_model=task.x.shape[1]))
    seen, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    config = TrainConfig(steps=2, schedule_steps=4, lr=0.1, lr_schedule="cosine", progress=False)
    train(model, toy_batches(task, 32), config)
    assert seen == pytest.approx([0.1, 0.1 * (1 + 2**-0.5) / 2]), "the 4-step cosine's first two"
    with pytest.raises(ValueError, match="schedule_steps must be >= start_step \\+ steps = 4, got"):
        TrainConfig(steps=4, schedule_steps=2)
    seen.clear()  # a run continued from step 2 of the same schedule: its last two steps
    train(model, toy_batches(task, 32), replace(config, start_step=2))
    assert seen == pytest.approx([0.05, 0.1 * (1 - 2**-0.5) / 2]), "the 4-step cosine's last two"
    seen.clear()  # without schedule_steps the schedule ends with the run
    train(model, toy_batches(task, 32), replace(config, start_step=2, schedule_steps=None))
    assert seen == pytest.approx([0.05, 0.1 * (1 - 2**-0.5) / 2])
    with pytest.raises(ValueError, match="start_step=-1"):
        TrainConfig(start_step=-1)
