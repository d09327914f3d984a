"""E feed-forward experts with stacked weights, so grouped computation is possible.

Layout as Hugging Face Mixtral (transformers 5): ``gate_up`` (E, 2h, d) holds the gate
and up projections of SwiGLU stacked, ``down`` (E, d, h). Expert e computes
    SwiGLU: down_e(silu(gate_e x) * up_e x)        GELU: down_e(gelu(up_e x))
    ReLU: down_e(relu(up_e x)) (Switch Transformers' experts)
With ``bias=True`` each projection adds a bias, ``gate_up_bias`` (E, 2h or h) and ``down_bias``
(E, d) (NLLB-MoE's experts): those run one matmul per expert (no grouped kernel, no threads).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimoe.checks import check_bool, check_choice, check_int
from minimoe.compiled import expert_ffn
from minimoe.threaded import ACTIVATIONS, ThreadedExperts, activate, check_counts, openmp_backend

_GROUPED_MM_FAILED: list[str] = []  # once it fails, stop trying
# On CPU the grouped kernel beats one matmul per expert only when the groups are small: measured
# (float32, d_model 256, SwiGLU width 512, 2 cores) 0.67x the loop's time at 16 rows per expert,
# 0.85x at 64, 0.95x at 128, 1.0x at 512, 1.2x at 256 and 2048 rows. Above this mean, the loop.
CPU_GROUPED_MAX_ROWS = 128
# With at least this many experts holding rows, on CPU with several torch threads, the experts
# are dealt out to threads (minimoe.threaded). Measured on 2 cores (layer fwd+bwd, d_model 256,
# width 512, top-2; time over the grouped kernel's): 0.89-1.0x at E=32 and E=64 for T=512 to
# 8192; 1.0-1.2x at E=8 and 16, whose experts have rows enough for torch's own split of a matmul.
CPU_THREADED_MIN_EXPERTS = 32


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_usable(x: Tensor, d_model: int, d_hidden: int) -> bool:
    """Feature detection for the grouped GEMM kernel ``F.grouped_mm``.

    CUDA: bfloat16 compute on sm80+. CPU: float32 compute (torch's CPU kernel runs the
    groups' matmuls in one call; in bfloat16 it is many times slower than the loop). Both
    need 16-byte aligned rows, so sizes that are multiples of 8.
    """
    if not hasattr(F, "grouped_mm") or _GROUPED_MM_FAILED or d_model % 8 or d_hidden % 8:
        return False
    if x.is_cuda:
        return (
            compute_dtype(x) == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 8
        )
    return x.device.type == "cpu" and compute_dtype(x) == torch.float32


def _threaded_usable(x: Tensor, weight: Tensor, counts: list[int]) -> bool:
    """Experts spread over threads (minimoe.threaded): CPU, several torch threads, no autocast,
    at least ``CPU_THREADED_MIN_EXPERTS`` experts with rows."""
    return (
        x.device.type == "cpu"
        and torch.get_num_threads() > 1
        and openmp_backend()
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == weight.dtype
        and sum(1 for c in counts if c) >= CPU_THREADED_MIN_EXPERTS
    )


class Experts(nn.Module):
    """``num_experts`` FFNs of width ``d_hidden``, run one at a time or grouped."""

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "swiglu",
        bias: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("num_experts", num_experts),
            ("d_model", d_model),
            ("d_hidden", d_hidden),
        ):
            check_int(name, value, 1)
        check_choice("activation", activation, ACTIVATIONS)
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.gate_up = nn.Parameter(torch.empty(num_experts, width, d_model))
        self.down = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))
        check_bool("bias", bias)
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the default init of nn.Linear, expert by expert (its bias too)
        for w, b, fan_in in (
            (self.gate_up, self.gate_up_bias, self.d_model),
            (self.down, self.down_bias, self.d_hidden),
        ):
            for t in (w, b) if b is not None else (w,):
                nn.init.uniform_(t, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def _act(self, h: Tensor) -> Tensor:
        return activate(h, self.activation)

    def _ffn(
        self,
        x: Tensor,
        gate_up: Tensor,
        down: Tensor,
        b1: Tensor | None = None,
        b2: Tensor | None = None,
    ) -> Tensor:
        return F.linear(self._act(F.linear(x, gate_up, b1)), down, b2)

    def _biases(self) -> list[tuple[Tensor | None, Tensor | None]]:
        """(gate_up bias, down bias) of each expert; Nones without biases."""
        if self.gate_up_bias is None:
            return [(None, None)] * self.num_experts
        return list(zip(self.gate_up_bias.unbind(0), self.down_bias.unbind(0), strict=True))

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on its tokens: (n, d) -> (n, d)."""
        if self.gate_up_bias is None:
            return self._ffn(x, self.gate_up[e], self.down[e])
        return self._ffn(x, self.gate_up[e], self.down[e], self.gate_up_bias[e], self.down_bias[e])

    def grouped(self, x: Tensor, counts: list[int] | Tensor) -> Tensor:
        """Tokens sorted by expert, ``counts[e]`` rows for expert e: (N, d) -> (N, d).

        ``counts`` as a (E,) tensor (what the dispatch passes under ``torch.compile``): the
        experts run as one custom operator the compiler does not look into
        (minimoe.compiled), in the compute dtype (autocast's, if on), threaded as below.

        On CPU with several torch threads, no autocast and at least
        ``CPU_THREADED_MIN_EXPERTS`` experts with rows, the experts are dealt out to threads,
        one core each (minimoe.threaded). Otherwise, with a torch that has ``F.grouped_mm``, on CUDA in bfloat16 (bfloat16 inputs, or
        bfloat16 autocast), and on CPU in float32 when the experts average at most
        ``CPU_GROUPED_MAX_ROWS`` rows (many small experts: it also spares backward stacking E
        per-expert weight gradients), all experts run in two grouped GEMMs; elsewhere, and if
        that kernel refuses the shapes, one matmul per expert.
        """
        if self.gate_up_bias is not None:  # the per-expert loop (under compile: a graph break)
            return self._loop(x, counts.tolist() if isinstance(counts, Tensor) else counts)
        if isinstance(counts, Tensor):
            dtype = compute_dtype(x)
            y, _, _ = expert_ffn(
                x.to(dtype),
                self.gate_up.to(dtype),
                self.down.to(dtype),
                counts,
                self.activation,
                CPU_THREADED_MIN_EXPERTS,
            )
            return y
        if not torch.compiler.is_compiling():  # counts are host ints: no sync to check them
            check_counts(counts, x.shape[0], self.num_experts)
        if _threaded_usable(x, self.gate_up, counts):
            threads = torch.get_num_threads()
            return ThreadedExperts.apply(
                x, self.gate_up, self.down, counts, self.activation, threads
            )
        small = x.shape[0] <= CPU_GROUPED_MAX_ROWS * len(counts)  # mean rows per expert
        if _grouped_mm_usable(x, self.d_model, self.d_hidden) and (x.is_cuda or small):
            try:
                return self._grouped_mm(x, counts)
            except RuntimeError as err:  # kernel constraints differ between torch releases
                _GROUPED_MM_FAILED.append(str(err))
                warnings.warn(
                    f"F.grouped_mm failed, using the per-expert loop: {err}", stacklevel=2
                )
        return self._loop(x, counts)

    def _loop(self, x: Tensor, counts: list[int]) -> Tensor:
        """One matmul per expert with rows."""
        # unbind once: indexing gate_up[e] per expert would make backward build E full-size
        # zero gradients, one per expert
        weights = zip(self.gate_up.unbind(0), self.down.unbind(0), self._biases(), strict=True)
        outs = [
            self._ffn(xe, w1, w2, *b)
            for xe, (w1, w2, b) in zip(x.split(counts), weights, strict=True)
            if xe.shape[0]
        ]
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)

    def _grouped_mm(self, x: Tensor, counts: list[int]) -> Tensor:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)  # end of each group
        if x.is_cuda:
            x = x.to(torch.bfloat16)  # autocast does not cover grouped_mm: cast by hand
        gate_up = self.gate_up.to(x.dtype).transpose(-2, -1)  # (E, d, 2h)
        down = self.down.to(x.dtype).transpose(-2, -1)  # (E, h, d)
        out = F.grouped_mm(self._act(F.grouped_mm(x, gate_up, offs=offs)), down, offs=offs)
        if out.requires_grad:  # its backward refuses a broadcast gradient (out.sum().backward())
            out.register_hook(Tensor.contiguous)
        return out

    def dense(self, x: Tensor) -> Tensor:
        """Every expert on every token: (T, d) -> (T, E, d). For teaching and tests."""
        return torch.stack([self.expert(e, x) for e in range(self.num_experts)], dim=1)

    def flops_per_assignment(self) -> int:
        """Multiply-adds x2 of one expert on one token (the matmuls; activations ignored)."""
        return 2 * self.gate_up.shape[1] * self.d_model + 2 * self.d_model * self.d_hidden

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, "
            f"d_hidden={self.d_hidden}, activation={self.activation!r}"
            + (", bias=True" if self.gate_up_bias is not None else "")
        )


class ConstantExperts(nn.Module):
    """MoE++'s constant experts (Jin et al. 2024, arXiv 2410.07348, eq. 5), c of them:

        E_j(x) = a_1 x + a_2 v_j,    [a_1, a_2] = softmax(W_j x)

    with a trained vector v_j (d,) (``vector``) and W_j (2, d) (``mix``): the token, partly
    replaced by a constant. The c of them cost O(c d) per token, computed for every token
    (``forward``), not an FFN's O(d h) per pair. Initialized as the released code (SkyworkAI/MoE-plus-plus) does: v ~ N(0, 1),
    W ~ N(0, 0.02^2) (its models initialize every Linear so).
    """

    def __init__(self, *, num_experts: int, d_model: int):
        super().__init__()
        check_int("num_experts", num_experts, 1)
        check_int("d_model", d_model, 1)
        self.vector = nn.Parameter(nn.init.normal_(torch.empty(num_experts, d_model)))
        self.mix = nn.Parameter(nn.init.normal_(torch.empty(num_experts, 2, d_model), std=0.02))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """(T, d) tokens and (T, c) combine weights g (0 where a token did not choose expert j)
        -> (T, d) sum_j g_j E_j(x) = x sum_j g_j a_1j + sum_j g_j a_2j v_j.

        Computed for every (token, constant expert) at once, as two matmuls c columns wide: an
        unchosen pair's g = 0 adds nothing, and on a CPU this is about 4x faster than gathering
        the chosen pairs (``benchmarks/moe_layer.py``, section 2b)."""
        c, d = self.vector.shape
        a = (x.float() @ self.mix.float().view(2 * c, d).T).view(-1, c, 2).softmax(-1)  # (T, c, 2)
        g = weights.float()  # (T, c)
        y = x.float() * (g * a[..., 0]).sum(1, keepdim=True) + (g * a[..., 1]) @ self.vector.float()
        return y.to(x.dtype)

    def flops_per_token(self) -> int:
        """Multiply-adds x2 per token, for all c at once: the 2c mix logits (2 x 2c d), the
        vectors' mix (2 c d) and x times its total weight (2 d); about 6 c d, not an FFN's."""
        c, d = self.vector.shape
        return 2 * 2 * c * d + 2 * c * d + 2 * d
