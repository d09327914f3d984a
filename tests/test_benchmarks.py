"""The benchmark scripts run end to end on tiny sizes, print every table and check their inputs.

Timings are never asserted (they live in the scripts' output, not in tests); what is asserted is
that the scripts still run against the library and print what benchmarks/README.md describes.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moe_layer():
    return load("moe_layer")


def test_paired_ratio_is_the_median_of_per_round_ratios(moe_layer):
    times = {"a": [2.0, 4.0, 30.0], "b": [1.0, 1.0, 10.0]}
    # per round 2, 4, 3 -> median 3; the ratio of the medians would say 4 / 1 = 4
    assert moe_layer.Timings(times).ratio("a", "b") == 3.0


def test_dense_ffn_equals_the_sum_of_two_experts(moe_layer):
    from minimoe.experts import Experts

    torch.manual_seed(0)
    experts = Experts(num_experts=4, d_model=16, d_hidden=8)
    dense = moe_layer.DenseSwiGLU.from_experts(experts, range(2))
    x = torch.randn(5, 16)
    torch.testing.assert_close(dense(x), experts.expert(0, x) + experts.expert(1, x))


@pytest.mark.parametrize("autocast", [[], ["--autocast", "bfloat16"]], ids=["float32", "bfloat16"])
def test_moe_layer_benchmark_prints_every_table(moe_layer, capsys, autocast):
    torch_threads = torch.get_num_threads()
    try:
        moe_layer.main(
            [
                "--tokens",
                "64",
                "--experts",
                "4",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--quick",
                *autocast,
            ]
        )
    finally:
        torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    for heading in (
        "#### 1. Dispatch paths",
        "#### 2. Dynamic routing",
        "#### 2b. Compute on demand",
        "#### 3. Memory",
        "#### 4. One expert",
    ):
        assert heading in out, f"missing table {heading!r}"
    assert "| 64 | fwd+bwd |" in out and "| 64 | adaptive |" in out
    for rule in ("null k=4", "identity k=4", "remoe", "threshold 2", "seqtopk 2"):
        row = next(line for line in out.splitlines() if line.startswith(f"| 64 | {rule} |"))
        assert row.split("|")[-3].strip() == "0", f"{rule}: free experts cost no expert FLOPs"
    assert "max|sorted - loop| = 0.00e+00" in out
    assert "allocator: the C library's malloc with its defaults" in out
    assert "minor page faults during one fwd+bwd step" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_moe_layer_benchmark_keeps_freed_memory_when_asked():
    # in a child process: mallopt changes the whole process's allocator
    args = "--quick --malloc keep --tokens 32 --experts 4 --repeats 1 --warmup 0 --threads 1"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), *args.split()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "allocator: glibc malloc keeping freed memory up to 1024 MiB" in done.stdout


def test_moe_layer_benchmark_refuses_cuda_without_a_gpu(moe_layer):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        moe_layer.main(["--device", "cuda"])


def test_the_e64_control_switches_the_threaded_path_off_and_back(moe_layer, monkeypatch):
    import minimoe.experts as experts_module
    from minimoe.layer import MoE, MoEConfig
    from minimoe.routing import TopK
    from minimoe.threaded import ThreadedExperts

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        E = experts_module.CPU_THREADED_MIN_EXPERTS
        moe = MoE(MoEConfig(d_model=16, d_hidden=16, num_experts=E, router=TopK(k=2)))
        calls = []
        original = ThreadedExperts.apply
        monkeypatch.setattr(ThreadedExperts, "apply", lambda *a: calls.append(1) or original(*a))
        x = torch.randn(256, 16)
        plain = moe(x).output
        assert calls == [1], "the default path takes the threaded experts here"
        control = moe_layer.WithoutThreads(moe)(x).output
        assert calls == [1], "the control does not"
        assert experts_module.CPU_THREADED_MIN_EXPERTS == E, "and it puts the switch back"
        torch.testing.assert_close(control, plain, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
