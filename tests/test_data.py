import pytest
import torch

from minimoe import data as D

# ---- toy task ---------------------------------------------------------------------------------


def test_toy_shapes_and_dtypes():
    t = D.make_toy_task(n=100, num_clusters=3, dim=5, out_dim=2)
    assert t.x.shape == (100, 5) and t.y.shape == (100, 2) and t.centers.shape == (3, 5)
    assert t.cluster.shape == t.margin.shape == (100,)
    assert t.cluster.dtype == torch.long and t.x.dtype == t.y.dtype == t.margin.dtype
    assert len(t) == 100 and set(t.cluster.tolist()) == {0, 1, 2}


def test_toy_determinism():
    a, b, c = (D.make_toy_task(n=512, seed=s) for s in (0, 0, 1))
    for f in ("x", "y", "cluster", "margin", "centers"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.x, c.x) and not torch.equal(a.centers, c.centers)


def test_toy_sample_seed_keeps_the_task():
    train = D.make_toy_task(n=256, seed=3)
    test = D.make_toy_task(n=128, seed=3, sample_seed=99)
    assert torch.equal(train.centers, test.centers) and torch.equal(train.w_in, test.w_in)
    assert not torch.equal(train.x[:128], test.x)


def test_toy_margin_and_overlap():
    t = D.make_toy_task()
    dist = torch.cdist(t.x, t.centers).sort(dim=1).values
    assert torch.allclose(t.margin, dist[:, 1] - dist[:, 0])
    assert (t.margin >= 0).all()
    assert 0.05 < (t.margin < 0.5).float().mean() < 0.35  # some points sit near a border
    wrong = torch.cdist(t.x, t.centers).argmin(1) != t.cluster
    assert 0.01 < wrong.float().mean() < 0.15  # clusters overlap a little, not much


def test_toy_targets_follow_the_cluster_function():
    t = D.make_toy_task(n=512, noise=0.0)
    assert torch.allclose(t.y, t.target(t.x, t.cluster))
    # by hand for one sample: y = tanh(x A_c) B_c
    i, c = 7, t.cluster[7]
    assert torch.allclose(t.y[i], torch.tanh(t.x[i] @ t.w_in[c]) @ t.w_out[c], atol=1e-5)
    # a wrong expert is clearly worse than the target's own spread
    wrong = t.target(t.x, (t.cluster + 1) % t.centers.shape[0])
    assert (wrong - t.y).pow(2).mean() > t.y.var(0).mean()
    noisy = D.make_toy_task(n=512, noise=0.1)
    assert torch.equal(noisy.x, t.x) and 0.05 < (noisy.y - t.y).std() < 0.2


def test_toy_split():
    t = D.make_toy_task(n=100)
    a, b = t.split(0.8)
    assert len(a) == 80 and len(b) == 20
    assert torch.equal(torch.cat([a.y, b.y]), t.y) and torch.equal(a.centers, t.centers)


# ---- the mixture testbed ----------------------------------------------------------------------


def test_mixture_task_levels_members_and_tags():
    t = D.make_mixture_task(n=4000, num_functions=6, content_dim=5, out_dim=3)
    assert t.x.shape == (4000, 5 + 6) and t.y.shape == (4000, 3) and t.member.shape == (4000, 6)
    assert torch.equal(t.member.sum(1), t.level), "a level-m sample mixes m functions"
    shares = t.level.bincount(minlength=4)[1:].float() / 4000
    assert torch.allclose(shares, torch.tensor([0.5, 0.35, 0.15]), atol=0.03)
    tag = t.x[:, 5:]  # the tag names the functions, each with weight tag_scale / m
    assert torch.allclose(tag, 2.0 * t.member.float() / t.level[:, None].float())
    assert torch.equal(t.content, t.x[:, :5])
    # every function appears at every level (uniform subsets): no function only in easy samples
    for m in (1, 2, 3):
        assert (t.member[t.level == m].sum(0) > 0).all()


def test_mixture_targets_are_the_mean_of_the_named_functions():
    t = D.make_mixture_task(n=50, num_functions=4, content_dim=3, out_dim=2, level_shares=(0, 0, 1))
    for i in range(5):
        z, funcs = t.content[i], t.member[i].nonzero().squeeze(1).tolist()
        by_hand = [torch.tanh(z @ t.w_in[c]) @ t.w_out[c] for c in funcs]  # f_c(z) = tanh(zA)B
        assert len(funcs) == 3
        assert torch.allclose(t.y[i], sum(by_hand) / 3, atol=1e-6)
    assert torch.equal(t.target(t.content, t.member), t.y)
    other = t.member.roll(1, dims=1)  # the same content under other functions: another target
    assert (t.target(t.content, other) - t.y).abs().mean() > 0.1


def test_mixture_task_seeds():
    a, b = D.make_mixture_task(n=100, seed=3), D.make_mixture_task(n=100, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = D.make_mixture_task(n=100, seed=3, sample_seed=9)  # same functions, other samples
    assert torch.equal(c.w_in, a.w_in) and not torch.equal(c.x, a.x)
    assert torch.equal(c.target(c.content, c.member), c.y)
    assert not torch.equal(D.make_mixture_task(n=100, seed=4).w_in, a.w_in)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n": 0}, ValueError, "n=0"),
        ({"num_functions": 2.0}, TypeError, "num_functions=2.0"),
        ({"level_shares": (0.5, 0.6)}, ValueError, r"sum to 1, got level_shares=\(0.5, 0.6\)"),
        ({"level_shares": (1.5, -0.5)}, ValueError, "level_shares=-0.5"),
        ({"level_shares": "0.5"}, TypeError, "level_shares"),
        ({"level_shares": (0.25,) * 4, "num_functions": 3}, ValueError, "num_functions=3"),
        ({"tag_scale": 0.0}, ValueError, "tag_scale must be > 0"),
        ({"tag_scale": float("nan")}, ValueError, "tag_scale=nan"),
    ],
)
def test_mixture_task_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        D.make_mixture_task(**kwargs)


def test_mixture_target_checks_shapes():
    t = D.make_mixture_task(n=10, num_functions=4, content_dim=3)
    with pytest.raises(ValueError, match=r"z \(N, 3\) and member \(N, 4\)"):
        t.target(t.x, t.member)  # the whole input, tag included
    with pytest.raises(ValueError, match="at least one function"):
        t.target(t.content, torch.zeros(10, 4, dtype=torch.bool))


# ---- multi-task tokens ------------------------------------------------------------------------


def test_vocab():
    assert D.VOCAB[:10] == [str(d) for d in range(10)]
    assert len(set(D.VOCAB)) == len(D.VOCAB) == 18 and D.VOCAB[D.PAD_ID] == "<pad>"
    assert D.decode([D.TASK_IDS[3], 1, D.PLUS_ID, 2, D.SEP_ID, 0, 3, D.EOS_ID, D.PAD_ID]) == (
        "<add>1+2=03<eos>"
    )


def test_multitask_shapes_shares_and_determinism():
    m = D.make_multitask(n=402, min_len=1, max_len=4, seed=5)
    L = D.seq_len(4)
    assert m.inputs.shape == m.targets.shape == (402, L) and m.inputs.dtype == torch.long
    assert m.task.bincount().tolist() == [101, 101, 100, 100]
    assert m.length.min() == 1 and m.length.max() == 4
    same, other = D.make_multitask(402, 1, 4, seed=5), D.make_multitask(402, 1, 4, seed=6)
    assert torch.equal(m.inputs, same.inputs) and torch.equal(m.targets, same.targets)
    assert not torch.equal(m.inputs, other.inputs)
    # fixed L: a call with other lengths and tasks stacks with this one
    assert D.make_multitask(8, 4, 4, tasks=("sort",)).inputs.shape[1] == L


def test_multitask_answers_are_correct():
    m = D.make_multitask(n=200, min_len=1, max_len=5, seed=1)
    for i in range(len(m)):
        name = D.TASKS[m.task[i]]
        prompt, answer = D.decode(m.inputs[i]).split("=")[0], D.decode(m.targets[i])
        assert prompt.startswith(f"<{name}>") and answer.endswith("<eos>")
        answer = answer.removesuffix("<eos>")
        ops = prompt[len(name) + 2 :].split("+")
        assert all(len(op) == m.length[i] for op in ops)
        expected = {
            "copy": ops[0],
            "reverse": ops[0][::-1],
            "sort": "".join(sorted(ops[0])),
            "add": str(sum(map(int, ops))).zfill(int(m.length[i]) + 1),
        }[name]
        assert answer == expected, (name, prompt, answer)


def test_multitask_targets_only_on_answers():
    m = D.make_multitask(n=64, seed=2)
    for i in range(len(m)):
        ans = m.answer_mask[i].nonzero().squeeze(1)
        start = (m.inputs[i] == D.SEP_ID).nonzero().item()  # "=" predicts the first answer digit
        assert ans.tolist() == list(range(start, start + len(ans)))
        assert m.targets[i, ans[-1]] == D.EOS_ID
        # targets are the inputs shifted by one where both exist
        assert torch.equal(m.targets[i, ans[:-1]], m.inputs[i, ans[:-1] + 1])
    assert (m.targets[~m.answer_mask] == D.IGNORE_INDEX).all()


def test_multitask_task_subset_keeps_global_indices():
    m = D.make_multitask(n=10, tasks=("copy", "add"))
    assert set(m.task.tolist()) == {0, 3}


# ---- byte corpus ------------------------------------------------------------------------------


def test_load_text_default_and_missing(tmp_path):
    text = D.load_text()
    assert len(text.encode()) > 500_000 and "HAMLET" in text
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        D.load_text(tmp_path / "nope.txt")


def test_byte_corpus_split_and_batches():
    text = "To be, or not to be: that is the question. Ünïcode!\n" * 20
    corpus = D.byte_corpus(text, val_frac=0.25)
    raw = list(text.encode("utf-8"))
    assert torch.cat([corpus.train, corpus.val]).tolist() == raw
    assert corpus.val.numel() == round(0.25 * len(raw)) and corpus.train.dtype == torch.long
    x, y = corpus.batch("train", 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-byte shift
    x2, _ = corpus.batch("train", 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    xv, yv = corpus.batch("val", 4, corpus.val.numel() - 1, torch.Generator().manual_seed(0))
    assert torch.equal(xv[0], corpus.val[:-1]) and torch.equal(yv[0], corpus.val[1:])


def test_byte_kind():
    ids = torch.tensor(list(b"Ab \n,.7\xc3"))
    kinds = [D.BYTE_KINDS[k] for k in D.byte_kind(ids).tolist()]
    assert kinds == ["letter"] * 2 + ["whitespace"] * 2 + ["punctuation"] * 2 + ["other"] * 2


# ---- argument checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: D.make_toy_task(n=0), "n must be positive, got 0"),
        (lambda: D.make_toy_task(num_clusters=1), "got 1"),
        (lambda: D.make_toy_task(spread=-1.0), "got -1.0"),
        (lambda: D.make_toy_task(n=10).split(1.0), "frac=1.0"),
        (lambda: D.make_multitask(n=-3), "got -3"),
        (lambda: D.make_multitask(tasks=("copy", "divide")), "'divide'"),
        (lambda: D.make_multitask(min_len=5, max_len=3), "min_len=5, max_len=3"),
        (lambda: D.byte_corpus("abcdef", val_frac=1.0), "got 1.0"),
        (lambda: D.byte_corpus("abcdef", val_frac=0), "got 0"),
        (lambda: D.byte_corpus("abcdef").batch("test", 1, 1, torch.Generator()), "'test'"),
        (lambda: D.byte_corpus("a" * 100).batch("val", 1, 10, torch.Generator()), "10"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _corpus():
    return D.byte_corpus("abcdefghij" * 10)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: D.make_toy_task(n=2.0), TypeError, "n must be an int, got n=2.0"),
        (lambda: D.make_toy_task(num_clusters=True), TypeError, "num_clusters=True"),
        (lambda: D.make_toy_task(dim=4.0), TypeError, "dim=4.0"),
        (lambda: D.make_toy_task(seed=0.5), TypeError, "seed=0.5"),
        (lambda: D.make_toy_task(sample_seed="1"), TypeError, "sample_seed='1'"),
        (lambda: D.make_toy_task(spread=float("nan")), ValueError, "spread=nan"),
        (lambda: D.make_toy_task(noise=float("nan")), ValueError, "noise=nan"),
        (lambda: D.make_toy_task(n=10).split(float("nan")), ValueError, "frac=nan"),
        (lambda: D.make_multitask(n=8.0), TypeError, "n=8.0"),
        (lambda: D.make_multitask(max_len=6.5), TypeError, "max_len=6.5"),
        (lambda: D.make_multitask(tasks="copy"), TypeError, "tasks.*'copy'"),
        (lambda: D.seq_len(0), ValueError, "max_len must be >= 1, got max_len=0"),
        (lambda: D.seq_len(2.0), TypeError, "max_len=2.0"),
        (lambda: _corpus().batch("train", 2.0, 4, torch.Generator()), TypeError, "batch_size=2.0"),
        (
            lambda: _corpus().batch("train", 0, 4, torch.Generator()),
            ValueError,
            "batch_size.*got 0",
        ),
        (lambda: _corpus().batch("train", 2, 0, torch.Generator()), ValueError, "block_size=0"),
        (lambda: _corpus().batch("train", 2, 4.0, torch.Generator()), TypeError, "block_size=4.0"),
        (lambda: _corpus().batch("train", 2, 4, None), TypeError, "generator.*NoneType"),
        (
            lambda: D.ByteCorpus(torch.arange(9), torch.arange(1)).batch(
                "val", 1, 1, torch.Generator()
            ),
            ValueError,
            "val split holds 1 bytes",
        ),
        (lambda: D.byte_corpus(b"abcdef"), TypeError, "text must be a str.*bytes"),
        (lambda: D.byte_corpus("abcdef", val_frac=float("nan")), ValueError, "val_frac=nan"),
    ],
)
def test_bad_types_and_sizes(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_negative_and_out_of_vocabulary_ids_do_not_wrap():
    assert D.decode([1, D.IGNORE_INDEX, D.PAD_ID, 2]) == "12"
    with pytest.raises(ValueError, match="ids holds -1"):
        D.decode([1, -1])  # VOCAB[-1] is <pad>: silently dropped before
    with pytest.raises(ValueError, match=f"ids holds {len(D.VOCAB)}"):
        D.decode(torch.tensor([len(D.VOCAB)]))
    with pytest.raises(TypeError, match="ids must be ints, got 1.0"):
        D.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"1-D.*\(2, 3\)"):
        D.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 256\), got -1"):
        D.byte_kind(torch.tensor([65, -1]))  # would be byte 255's kind
    with pytest.raises(ValueError, match="got 256"):
        D.byte_kind(torch.tensor([256]))
    with pytest.raises(TypeError, match="float32"):
        D.byte_kind(torch.tensor([65.7]))
    assert D.byte_kind(torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_toy_target_checks_clusters():
    t = D.make_toy_task(n=10, num_clusters=3, dim=4)
    with pytest.raises(ValueError, match=r"cluster must be in \[0, 3\), got -1"):
        t.target(t.x[:2], torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="got 3"):
        t.target(t.x[:1], torch.tensor([3]))
    with pytest.raises(ValueError, match=r"x \(2, 4\) and cluster \(3,\)"):
        t.target(t.x[:2], torch.tensor([0, 1, 2]))


def test_batch_samplers_refuse_empty_and_float_batches():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got batch_size=0"):
        D.toy_batches(D.make_toy_task(n=10), 0)
    with pytest.raises(TypeError, match="batch_size=2.0"):
        D.multitask_batches(D.make_multitask(n=8), 2.0)
    with pytest.raises(ValueError, match="block_size=0"):
        D.lm_batches(_corpus(), 4, 0)
    batch = D.lm_batches(_corpus(), 3, 5)(torch.Generator().manual_seed(0))
    assert batch["idx"].shape == batch["targets"].shape == (3, 5)


def test_dirichlet_mixing_weighs_each_input_by_its_tag():
    t = D.make_mixture_task(
        3000, num_functions=6, content_dim=5, out_dim=3, seed=2, mixing="dirichlet"
    )
    assert torch.allclose(t.weights.sum(1), torch.ones(3000))
    assert ((t.weights > 0) == t.member).all(), "weights only on the named functions"
    assert torch.allclose(t.x[:, 5:], 2.0 * t.weights), "the tag carries the weights"
    i = int((t.level == 2).nonzero()[0])
    funcs = t.member[i].nonzero().squeeze(1)
    one = [
        t.target(t.content[i : i + 1], torch.nn.functional.one_hot(c, 6).bool()[None])
        for c in funcs
    ]
    by_hand = sum(t.weights[i, c] * f for c, f in zip(funcs, one))
    torch.testing.assert_close(by_hand, t.y[i : i + 1])
    assert not torch.allclose(t.weights[t.level == 2].max(1).values, torch.tensor(0.5)), "unequal"
    with pytest.raises(ValueError, match="mixing"):
        D.make_mixture_task(100, mixing="uniform")


def test_a_corpus_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text \\(byte 3"):
        D.load_text(path)
