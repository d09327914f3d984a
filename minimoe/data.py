"""Data sets for the course: a toy regression task, graded token tasks, and a byte-level corpus.

Ground floor: imports nothing from the rest of minimoe but its input checks (``minimoe.checks``). Every generator is deterministic given its
seed and uses a local `torch.Generator`, never the global RNG.
"""

from __future__ import annotations

import importlib.resources
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path

import torch
from torch import Tensor

from minimoe.checks import check_choice, check_float, check_int


def _require_ids(name: str, ids: object, high: int) -> None:
    """An integer tensor with every value in [0, high); indexing would wrap negative ids."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= high)]
    if bad.numel():
        raise ValueError(f"{name} must be in [0, {high}), got {bad[0].item()}")


# ---------------------------------------------------------------------------------------------
# 1. Toy mixture-of-experts regression (chapters 1-3)
# ---------------------------------------------------------------------------------------------

TOY_HIDDEN = 32  # width of each cluster's target function
TOY_SEPARATION = 3.5  # distance of the two closest centres (noise std is `spread` per coordinate)


@dataclass
class ToyTask:
    """Samples of a task whose right expert is known: cluster c's inputs follow function c.

    The centres and functions (`centers`, `w_in`, `w_out`) depend only on `seed`, `num_clusters`,
    `dim` and `out_dim`; the samples also depend on `sample_seed`, so a train and a test set made
    with the same `seed` and different `sample_seed` share one task.
    """

    x: Tensor  # (N, dim) inputs
    y: Tensor  # (N, out_dim) targets
    cluster: Tensor  # (N,) long, the cluster (= target function) that made each sample
    margin: Tensor  # (N,) distance to 2nd-nearest centre minus to nearest; small = ambiguous
    centers: Tensor  # (C, dim)
    w_in: Tensor  # (C, dim, TOY_HIDDEN) first weights of each cluster's function
    w_out: Tensor  # (C, TOY_HIDDEN, out_dim) second weights of each cluster's function

    def __len__(self) -> int:
        return self.x.shape[0]

    def target(self, x: Tensor, cluster: Tensor) -> Tensor:
        """Noise-free target of each row of `x` (N, dim) under the function of `cluster` (N,)."""
        _require_ids("cluster", cluster, self.centers.shape[0])
        if x.dim() != 2 or x.shape[1] != self.centers.shape[1] or cluster.shape != x.shape[:1]:
            raise ValueError(
                f"need x (N, {self.centers.shape[1]}) and cluster (N,), got x "
                f"{tuple(x.shape)} and cluster {tuple(cluster.shape)}"
            )
        return _toy_target(x, cluster, self.w_in, self.w_out)

    def split(self, frac: float) -> tuple[ToyTask, ToyTask]:
        """The first `frac` of the samples and the rest (samples are already in random order)."""
        check_float("frac", frac, -math.inf)
        k = round(frac * len(self))
        if not 0 < k < len(self):
            raise ValueError(f"frac={frac} leaves an empty part of {len(self)} samples")
        head = {f: getattr(self, f)[:k] for f in ("x", "y", "cluster", "margin")}
        tail = {f: getattr(self, f)[k:] for f in ("x", "y", "cluster", "margin")}
        return replace(self, **head), replace(self, **tail)


def _toy_target(x: Tensor, cluster: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    hidden = torch.tanh(torch.einsum("nd,ndh->nh", x, w_in[cluster]))  # (N, TOY_HIDDEN)
    return torch.einsum("nh,nho->no", hidden, w_out[cluster])  # (N, out_dim)


def _spread_directions(num: int, dim: int, g: torch.Generator, tries: int = 64) -> Tensor:
    """`num` unit vectors in `dim` dimensions: the best-separated of `tries` random draws."""
    cand = torch.randn(tries, num, dim, generator=g)
    cand = cand / cand.norm(dim=-1, keepdim=True)  # (tries, num, dim)
    return cand[_closest_gap(cand).argmax()]


def _closest_gap(points: Tensor) -> Tensor:
    """Smallest distance between two distinct rows of `points` (..., num, dim)."""
    self_pairs = torch.eye(points.shape[-2], dtype=torch.bool)
    return torch.cdist(points, points).masked_fill(self_pairs, float("inf")).amin(dim=(-2, -1))


def make_toy_task(
    n: int = 4096,
    num_clusters: int = 4,
    dim: int = 16,
    out_dim: int = 8,
    spread: float = 1.0,
    seed: int = 0,
    noise: float = 0.0,
    sample_seed: int | None = None,
) -> ToyTask:
    """Gaussian clusters around `num_clusters` centres, cluster c labelled by y = tanh(x A_c) B_c.

    The two closest centres are `TOY_SEPARATION` apart, so at spread=1 about 7% of the points lie
    nearer another cluster's centre than their own (by default, nearly 20% have margin < 0.5).
    Independent random A_c, B_c make the functions clearly different: the wrong expert's error is
    of the order of the targets' own variance. `noise` adds Gaussian noise of that std to y.
    """
    ints = {"n": n, "num_clusters": num_clusters, "dim": dim, "out_dim": out_dim, "seed": seed}
    for name, value in ints.items():
        check_int(name, value)
    if sample_seed is not None:
        check_int("sample_seed", sample_seed)
    check_float("spread", spread, -math.inf)
    check_float("noise", noise, -math.inf)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if num_clusters < 2:
        raise ValueError(f"num_clusters must be at least 2, got {num_clusters}")
    if dim <= 0 or out_dim <= 0:
        raise ValueError(f"dim and out_dim must be positive, got dim={dim}, out_dim={out_dim}")
    if spread <= 0:
        raise ValueError(f"spread must be positive, got {spread}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")

    g = torch.Generator().manual_seed(seed)
    dirs = _spread_directions(num_clusters, dim, g)  # (C, dim)
    radius = TOY_SEPARATION / _closest_gap(dirs).item()
    centers = dirs * radius
    # Scale so that pre-activations are O(1) for points of norm ~ sqrt(radius^2 + dim) (spread=1).
    w_in = torch.randn(num_clusters, dim, TOY_HIDDEN, generator=g) / (radius**2 + dim) ** 0.5
    w_out = torch.randn(num_clusters, TOY_HIDDEN, out_dim, generator=g) / TOY_HIDDEN**0.5

    gs = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    cluster = torch.randint(num_clusters, (n,), generator=gs)
    x = centers[cluster] + spread * torch.randn(n, dim, generator=gs)  # (N, dim)
    nearest2 = torch.cdist(x, centers).topk(2, dim=1, largest=False).values  # (N, 2), ascending
    y = _toy_target(x, cluster, w_in, w_out) + noise * torch.randn(n, out_dim, generator=gs)
    return ToyTask(x, y, cluster, nearest2[:, 1] - nearest2[:, 0], centers, w_in, w_out)


# ---------------------------------------------------------------------------------------------
# 1b. Known-answer testbed: which experts an input needs, and how many, known by construction
# ---------------------------------------------------------------------------------------------

MIXINGS = ("equal", "dirichlet")  # how a level-m sample weighs its m functions
MIXTURE_HIDDEN = 8  # width of each target function: one expert of a few times this fits one


@dataclass
class MixtureTask:
    """Samples whose right experts and whose need for compute are known by construction.

    C functions f_c(z) = tanh(z A_c) B_c. A sample at level m draws m distinct functions S
    (its ``member`` row) and content z ~ N(0, I); its target is their mean, its input names them:
        y = (1/m) sum_{c in S} f_c(z)          x = [z, tag],  tag_c = tag_scale * [c in S] / m
    Level 1 needs one expert (the one that learned f_c), level m needs m of them: experts
    combined with equal weights give the mean, while one expert alone would have to learn
    every mixture of functions. ``w_in``, ``w_out`` depend only on ``seed`` and the sizes;
    the samples also on ``sample_seed``, so train and test sets can share one task.
    """

    x: Tensor  # (N, content_dim + C) inputs: content z, then the tag naming the functions
    y: Tensor  # (N, out_dim) targets
    level: Tensor  # (N,) long, how many functions are mixed: the experts a sample needs
    member: Tensor  # (N, C) bool, which functions are mixed (the right experts, up to a relabel)
    w_in: Tensor  # (C, content_dim, MIXTURE_HIDDEN)
    w_out: Tensor  # (C, MIXTURE_HIDDEN, out_dim)
    weights: Tensor | None = None  # (N, C) each function's share of the target; None: 1/m each

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def content(self) -> Tensor:
        """(N, content_dim) the content z of each sample (x without its tag)."""
        return self.x[:, : self.w_in.shape[1]]

    def target(self, z: Tensor, member: Tensor, weights: Tensor | None = None) -> Tensor:
        """Noise-free targets of content ``z`` (N, content_dim) mixing the ``member`` (N, C)
        functions, with ``weights`` (N, C) (default: equal)."""
        num_functions, content_dim = self.w_in.shape[:2]
        if z.dim() != 2 or z.shape[1] != content_dim or member.shape != (z.shape[0], num_functions):
            raise ValueError(
                f"need z (N, {content_dim}) and member (N, {num_functions}), got z "
                f"{tuple(z.shape)} and member {tuple(member.shape)}"
            )
        if member.dtype != torch.bool or not member.any(1).all():
            raise ValueError("member must be bool with at least one function per row")
        if weights is not None and weights.shape != member.shape:
            raise ValueError(
                f"weights must be (N, C) like member {tuple(member.shape)}, got {tuple(weights.shape)}"
            )
        return _mixture_target(z, member, self.w_in, self.w_out, weights)


def _mixture_target(
    z: Tensor, member: Tensor, w_in: Tensor, w_out: Tensor, weights: Tensor | None = None
) -> Tensor:
    hidden = torch.tanh(torch.einsum("nd,cdh->nch", z, w_in))  # (N, C, hidden) every function
    f = torch.einsum("nch,cho->nco", hidden, w_out)  # (N, C, out_dim)
    m = member.to(f.dtype)  # (N, C)
    if weights is not None:  # (N, C), zero outside S, each row summing to 1
        return (f * (weights * m)[:, :, None]).sum(1)
    return (f * m[:, :, None]).sum(1) / m.sum(1, keepdim=True)  # (N, out_dim) mean over S


def make_mixture_task(
    n: int = 8192,
    num_functions: int = 8,
    content_dim: int = 8,
    out_dim: int = 8,
    level_shares: Sequence[float] = (0.5, 0.35, 0.15),
    tag_scale: float = 2.0,
    seed: int = 0,
    sample_seed: int | None = None,
    mixing: str = "equal",
) -> MixtureTask:
    """``n`` samples; ``level_shares[m - 1]`` is the expected share at level m (they sum to 1).

    The default mix: half the samples need one expert, 35% two, 15% three. Level m's functions
    are a uniform random m-subset of the ``num_functions``. ``mixing="equal"`` weighs a level-m
    sample's functions 1/m each; ``"dirichlet"`` draws each sample's weights from a flat
    Dirichlet over its m functions (the tag carries them), so no fixed share per level favours
    a routing rule with a threshold on the router's probabilities (top-p keeps m equal shares
    only for p > (m - 1) / m).
    """
    ints = {"n": n, "num_functions": num_functions, "content_dim": content_dim}
    for name, value in (ints | {"out_dim": out_dim}).items():
        check_int(name, value, 1)
    check_int("seed", seed)
    if sample_seed is not None:
        check_int("sample_seed", sample_seed)
    check_float("tag_scale", tag_scale, 0.0)
    check_choice("mixing", mixing, MIXINGS)
    if tag_scale == 0:
        raise ValueError("tag_scale must be > 0 (the tag is how an input names its functions)")
    if isinstance(level_shares, (str, Tensor)) or not isinstance(level_shares, Sequence):
        raise TypeError(f"level_shares must be a sequence of numbers, got {level_shares!r}")
    for share in level_shares:
        check_float("level_shares", share, 0.0)
    if not level_shares or not math.isclose(sum(level_shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"level_shares must sum to 1, got level_shares={tuple(level_shares)}")
    if len(level_shares) > num_functions:
        raise ValueError(
            f"level {len(level_shares)} needs that many distinct functions, got "
            f"num_functions={num_functions}"
        )

    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(num_functions, content_dim, MIXTURE_HIDDEN, generator=g) / content_dim**0.5
    w_out = torch.randn(num_functions, MIXTURE_HIDDEN, out_dim, generator=g) / MIXTURE_HIDDEN**0.5

    gs = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
    shares = torch.tensor([float(s) for s in level_shares])
    level = torch.multinomial(shares, n, replacement=True, generator=gs) + 1  # (N,) in 1..M
    order = torch.rand(n, num_functions, generator=gs).argsort(dim=1)  # (N, C) random ranking
    member = torch.zeros(n, num_functions, dtype=torch.bool).scatter_(
        1, order, torch.arange(num_functions).expand(n, -1) < level[:, None]
    )  # (N, C) the first `level` functions of each row's ranking
    z = torch.randn(n, content_dim, generator=gs)
    if mixing == "equal":
        tag = tag_scale * member.float() / level[:, None]  # (N, C)
        y = _mixture_target(z, member, w_in, w_out)
        return MixtureTask(torch.cat([z, tag], dim=1), y, level, member, w_in, w_out)
    # a flat Dirichlet over S: exponential draws, normalized
    draws = -torch.rand(n, num_functions, generator=gs).clamp_min(1e-12).log() * member
    weights = draws / draws.sum(1, keepdim=True)  # (N, C)
    y = _mixture_target(z, member, w_in, w_out, weights)
    x = torch.cat([z, tag_scale * weights], dim=1)
    return MixtureTask(x, y, level, member, w_in, w_out, weights)


# ---------------------------------------------------------------------------------------------
# 2. Token tasks of graded difficulty (chapters 4-5)
# ---------------------------------------------------------------------------------------------

TASKS = ("copy", "reverse", "sort", "add")  # index = difficulty level
VOCAB: list[str] = [str(d) for d in range(10)] + [f"<{t}>" for t in TASKS]
VOCAB += ["+", "=", "<eos>", "<pad>"]
TASK_IDS = tuple(VOCAB.index(f"<{t}>") for t in TASKS)
PLUS_ID, SEP_ID, EOS_ID, PAD_ID = (VOCAB.index(t) for t in ("+", "=", "<eos>", "<pad>"))
IGNORE_INDEX = -100  # the default ignore_index of torch.nn.functional.cross_entropy


@dataclass
class MultiTaskData:
    """`<task> operand(s) = answer <eos>` sequences, padded, shifted for next-token prediction.

    Operands are `length` uniform random digits (leading zeros allowed); `add` writes
    `a + b = sum` with the sum zero-padded to length + 1 digits.
    """

    inputs: Tensor  # (N, L) long token ids
    targets: Tensor  # (N, L) long next-token ids, IGNORE_INDEX except on answer digits and <eos>
    task: Tensor  # (N,) long index into TASKS (= difficulty level)
    length: Tensor  # (N,) long number of digits of each operand

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def answer_mask(self) -> Tensor:
        """(N, L) bool, True where the target is part of the answer (the positions scored)."""
        return self.targets != IGNORE_INDEX


def seq_len(max_len: int) -> int:
    """L for operands of at most `max_len` digits: the longest sample (add) minus the shift."""
    check_int("max_len", max_len)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got max_len={max_len}")
    return 3 * max_len + 4  # <add> a + b = (max_len+1 digits) <eos>, one fewer after shifting


def _answer(task: str, a: list[int], b: list[int]) -> list[int]:
    if task == "copy":
        return a
    if task == "reverse":
        return a[::-1]
    if task == "sort":
        return sorted(a)
    total = int("".join(map(str, a))) + int("".join(map(str, b)))
    return [int(c) for c in str(total).zfill(len(a) + 1)]


def make_multitask(
    n: int = 2048,
    min_len: int = 2,
    max_len: int = 6,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
) -> MultiTaskData:
    """`n` samples in random order, an equal share per task (to within one), lengths uniform in
    [min_len, max_len]. L = seq_len(max_len), so calls with the same max_len stack."""
    for name, value in (("n", n), ("min_len", min_len), ("max_len", max_len), ("seed", seed)):
        check_int(name, value)
    if isinstance(tasks, str):  # would be read letter by letter
        raise TypeError(f"tasks must be a sequence of task names, got the str {tasks!r}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if not tasks:
        raise ValueError("tasks is empty")
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task in {tuple(tasks)}")

    g = torch.Generator().manual_seed(seed)
    chosen = torch.tensor([TASKS.index(t) for t in tasks])
    task = chosen[torch.arange(n) % len(chosen)][torch.randperm(n, generator=g)]  # (N,)
    length = torch.randint(min_len, max_len + 1, (n,), generator=g)
    digits = torch.randint(10, (n, 2, max_len), generator=g).tolist()  # (N, 2, max_len)

    L = seq_len(max_len)
    inputs = torch.full((n, L + 1), PAD_ID)  # (N, L+1) unshifted sequences
    targets = torch.full((n, L + 1), IGNORE_INDEX)
    for i, (t, k) in enumerate(zip(task.tolist(), length.tolist(), strict=True)):
        a, b = digits[i][0][:k], digits[i][1][:k]
        prompt = [TASK_IDS[t]] + a + ([PLUS_ID] + b if TASKS[t] == "add" else [])
        answer = _answer(TASKS[t], a, b) + [EOS_ID]
        seq = prompt + [SEP_ID] + answer
        inputs[i, : len(seq)] = torch.tensor(seq)
        targets[i, len(seq) - len(answer) : len(seq)] = torch.tensor(answer)
    return MultiTaskData(inputs[:, :-1], targets[:, 1:], task, length)


def decode(ids: Tensor | Sequence[int]) -> str:
    """Token ids to text, run together: '<add>12+34=046<eos>'. Drops <pad> and IGNORE_INDEX."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D (one sequence), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"ids must be ints, got {i!r}")
        if i != IGNORE_INDEX and not 0 <= i < len(VOCAB):  # VOCAB[-1] would wrap to <pad>
            raise ValueError(f"ids holds {i}: not a token id in [0, {len(VOCAB)}) nor IGNORE_INDEX")
    return "".join(VOCAB[i] for i in ids if i not in (PAD_ID, IGNORE_INDEX))


# ---------------------------------------------------------------------------------------------
# 3. Byte-level text corpus (a small real language-modelling task)
# ---------------------------------------------------------------------------------------------

BYTE_VOCAB_SIZE = 256
# "other" holds digits, control bytes and every non-ASCII byte.
BYTE_KINDS = ("letter", "whitespace", "punctuation", "other")
CORPUS = "corpus/shakespeare.txt"  # package data of minimoe: eight plays, see data/README.md


def _byte_kind_table() -> Tensor:
    table = torch.full((256,), BYTE_KINDS.index("other"))
    # letter, whitespace, punctuation: the first three BYTE_KINDS, in order
    for kind, chars in enumerate((string.ascii_letters, string.whitespace, string.punctuation)):
        table[[ord(c) for c in chars]] = kind
    return table


_BYTE_KIND = _byte_kind_table()


def byte_kind(ids: Tensor) -> Tensor:
    """Kind of each byte id, same shape, long index into BYTE_KINDS."""
    _require_ids("ids", ids, BYTE_VOCAB_SIZE)
    return _BYTE_KIND[ids.long()]


def load_text(path: str | Path | None = None) -> str:
    """Read a UTF-8 text file; by default the corpus installed with the package (``CORPUS``)."""
    if path is None:
        return importlib.resources.files("minimoe").joinpath(CORPUS).read_text(encoding="utf-8")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no text file at {path}; pass a UTF-8 text file, or no path for the default corpus"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r}); "
            "pass a UTF-8 text file"
        ) from None


@dataclass
class ByteCorpus:
    """A text as byte ids (vocabulary 256), split into a leading train part and a trailing val part."""

    train: Tensor  # (N_train,) long byte ids
    val: Tensor  # (N_val,) long byte ids

    def batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random windows: inputs (B, block_size) and their next-byte targets (B, block_size)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.train if split == "train" else self.val
        check_int("batch_size", batch_size)
        check_int("block_size", block_size)
        if not isinstance(generator, torch.Generator):  # None would draw from the global RNG
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(data) < 2:
            raise ValueError(f"the {split} split holds {len(data)} bytes: too few for a window")
        if not 0 < block_size < len(data):
            raise ValueError(f"block_size={block_size} must be in [1, {len(data) - 1}] for {split}")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        window = data[starts[:, None] + torch.arange(block_size + 1)]  # (B, block_size + 1)
        return window[:, :-1], window[:, 1:]


def byte_corpus(text: str | None = None, val_frac: float = 0.1) -> ByteCorpus:
    """UTF-8 bytes of `text` (default: load_text()); the last `val_frac` of them is validation.

    A contiguous split, not a random one, so no validation window overlaps a training window.
    """
    if text is not None and not isinstance(text, str):
        raise TypeError(f"text must be a str (None: the default corpus), got {type(text).__name__}")
    check_float("val_frac", val_frac, -math.inf)
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    raw = (load_text() if text is None else text).encode("utf-8")
    cut = round(len(raw) * (1 - val_frac))
    if not 0 < cut < len(raw):
        raise ValueError(f"val_frac={val_frac} leaves an empty split of {len(raw)} bytes")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()  # (N,)
    return ByteCorpus(ids[:cut], ids[cut:])


# ---------------------------------------------------------------------------------------------
# 4. Batch samplers: ``get_batch(generator) -> Batch``, what the trainer calls every step
# ---------------------------------------------------------------------------------------------

Batch = dict[str, Tensor]  # the model's keyword arguments: {idx, targets} or {x, y}


def lm_batches(
    corpus: ByteCorpus, batch_size: int, block_size: int, split: str = "train"
) -> Callable[[torch.Generator], Batch]:
    """Random windows of the byte corpus as {idx, targets}."""
    check_int("batch_size", batch_size, 1)  # here, not at the first step
    check_int("block_size", block_size, 1)

    def get(g: torch.Generator) -> Batch:
        idx, targets = corpus.batch(split, batch_size, block_size, g)
        return {"idx": idx, "targets": targets}

    return get


def multitask_batches(data: MultiTaskData, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """Random samples of the graded token tasks as {idx, targets} (loss on answers only)."""
    check_int("batch_size", batch_size, 1)

    def get(g: torch.Generator) -> Batch:
        i = torch.randint(0, len(data), (batch_size,), generator=g)
        return {"idx": data.inputs[i], "targets": data.targets[i]}

    return get


def toy_batches(task: ToyTask | MixtureTask, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """Random samples of a regression task (the toy task or the mixture testbed) as {x, y}."""
    check_int("batch_size", batch_size, 1)

    def get(g: torch.Generator) -> Batch:
        i = torch.randint(0, len(task), (batch_size,), generator=g)
        return {"x": task.x[i], "y": task.y[i]}

    return get
