"""The command line: router flags become specs, and bad options are refused naming the flag."""

import argparse
from dataclasses import field, fields, make_dataclass
from operator import attrgetter
from pathlib import Path

import pytest

from course.__main__ import main as course_main
from minimoe import cli
from minimoe.__main__ import main
from minimoe.layer import MoEConfig
from minimoe.routing import (
    ROUTERS,
    Adaptive,
    CapacityTopK,
    ExpertChoice,
    GWBroadcast,
    HashTopK,
    NoisyTopK,
    ScoreTopK,
    SigmoidTopK,
    SparseMixer,
    TopK,
    TopP,
)
from minimoe.routing.flags import router_flags

TINY = [
    *"--layers 1 --heads 2 --d-model 16 --d-hidden 16 --experts 4 --block-size 16 --batch-size 4 --steps 2 --no-progress --device cpu".split()
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def refused(argv: list[str], capsys, run=main) -> str:
    """The error message of a command line that must be refused (argparse: exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, spec",
    [
        ([], TopK()),
        (["--k", "1", "--no-renormalize"], TopK(k=1, renormalize=False)),
        (["--router", "noisy_top_k", "--k", "3"], NoisyTopK(k=3)),
        (
            ["--router", "top_p", "--top-p", "0.3", "--top-p-rule", "code", "--max-experts", "2"],
            TopP(p=0.3, rule="code", max_experts=2),
        ),
        (
            ["--router", "adaptive", "--adaptive-threshold", "0.2", "--adaptive-gap", "normalized"],
            Adaptive(threshold=0.2, gap="normalized"),
        ),
        (["--router", "gw"], GWBroadcast()),
        (
            [*"--router gw --k 1 --gw-threshold 1.6 --gw-measure entropy --gw-max-slots 3".split()],
            GWBroadcast(TopK(k=1, renormalize=True), threshold=1.6, measure="entropy", max_slots=3),
        ),
        (
            [*"--router sigmoid_top_k --k 4 --bias-rate 0.01 --n-group 4 --topk-group 2".split()],
            SigmoidTopK(k=4, bias_rate=0.01, n_group=4, topk_group=2),
        ),
        (
            [*"--router sigmoid_top_k --score softmax --scaling 2.5 --no-renormalize".split()],
            SigmoidTopK(score="softmax", scaling=2.5, renormalize=False),
        ),
        (["--router", "expert_choice", "--choice-capacity", "1.5"], ExpertChoice(1.5)),
        (
            [*"--router score_top_k --k 3 --score sigmoid --n-group 4 --topk-group 2".split()],
            ScoreTopK(k=3, score="sigmoid", n_group=4, topk_group=2),
        ),
        (["--router", "hash_top_k", "--scaling", "1.5"], HashTopK(scaling=1.5)),
    ],
)
def test_router_flags_build_the_spec(flags, spec):
    config = cli.moe_config_from_args(parse(flags))
    assert config.router == spec and config.num_experts == 8


def as_flags(router) -> list[str]:
    """The command line of ``router``: ``--router`` and a flag for each of its settings."""
    argv = ["--router", router.name]
    for dest, settings in cli.ROUTER_FLAGS.items():
        for s in settings:
            value = attrgetter(s.field)(router) if s.router == router.name else None
            if isinstance(value, bool):
                argv.append(f"--{'' if value else 'no-'}{dest.replace('_', '-')}")
            elif value is not None:
                argv.append(f"--{dest.replace('_', '-')}={value}")
    return argv


@pytest.mark.parametrize(
    "spec",
    [
        *(cls() for cls in ROUTERS.values()),  # every registered router's defaults
        TopP(p=0.3, rule="code", max_experts=2),
        GWBroadcast(TopK(k=3), threshold=1.6, measure="entropy", max_slots=3),
        SigmoidTopK(k=1, score="softmax", bias_rate=0.0, renormalize=False, scaling=2.5),
        ScoreTopK(score="logits", weight="softmax", norm_p=2.0, softcap=30.0, null_experts=1),
        ScoreTopK(selection_bias=True, bias_rate=0.01, n_group=4, topk_group=2, group_score="max"),
        CapacityTopK(k=1, expert_capacity=4, per_sequence=True, normalize="none"),
        HashTopK(k=1, vocab_size=64, score="softmax", seed=3),
        SparseMixer(jitter_eps=0.1, sample_in_training=False),
        ScoreTopK(input_norm=True, input_norm_eps=1e-5, expert_scales=True),
    ],
    ids=repr,
)
def test_a_spec_as_flags_parses_back_to_the_same_spec(spec):
    argv = as_flags(spec)
    assert cli.moe_config_from_args(parse(argv)).router == spec, argv


def test_every_router_field_is_a_flag_or_says_why_not():
    flagged = {(s.router, s.field) for settings in cli.ROUTER_FLAGS.values() for s in settings}
    for name, cls in ROUTERS.items():
        for f in fields(cls):
            why_not = f.metadata.get("no_flag") or f.metadata.get("base")
            assert ((name, f.name) in flagged) != bool(why_not), (
                f"{cls.__name__}.{f.name}: a flag, or field(metadata={{'no_flag': why}})"
            )


def odd_router(k_type: type, default: object = 2, **metadata) -> type:
    """A throwaway spec with one field ``k``."""
    return make_dataclass("Odd", [("k", k_type, field(default=default, metadata=metadata))])


@pytest.mark.parametrize(
    "odd, error",
    [
        (
            odd_router(float, help="experts per token", positive=True),
            "--k would mean two things: top_k's k is an int >= 1, help 'experts per token'; "
            "odd's k is a number > 0, help 'experts per token'",
        ),
        (odd_router(int, help="experts per token"), "odd's k is an int >= 0"),
        (odd_router(int, help="keys", positive=True), "odd's k is an int >= 1, help 'keys'"),
        (
            odd_router(int, positive=True),
            "Odd.k would be the router flag --k of 'odd' but has no help",
        ),
        (odd_router(int, help="experts per token", postive=True), "unknown metadata ['postive']"),
        (odd_router(tuple, (), help="experts per token"), "its type <class 'tuple'> cannot be one"),
    ],
)
def test_a_flag_that_would_mean_two_things_is_refused(odd, error):
    with pytest.raises(TypeError) as e:
        router_flags({"top_k": TopK, "odd": odd})
    assert error in str(e.value)


def test_a_field_with_its_own_flag_name_does_not_collide():
    odd = odd_router(float, flag="odd_k", help="a number")
    assert [s.field for s in router_flags({"top_k": TopK, "odd": odd})["odd_k"]] == ["k"]


def test_router_flags_are_not_named_as_layer_fields():
    # the command line holds router flags and layer options in one namespace (moe_config_from_args)
    assert not set(cli.ROUTER_FLAGS) & {f.name for f in fields(MoEConfig)}


def test_train_help_names_the_routers_of_each_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "experts per token (top_k, noisy_top_k, gw's base, sigmoid_top_k" in text
    assert "(sigmoid_top_k: sigmoid or softmax, default sigmoid; score_top_k" in text
    for dest, settings in cli.ROUTER_FLAGS.items():
        assert f"--{dest.replace('_', '-')}" in text
        assert all(s.router in text for s in settings)


def test_every_registered_router_is_a_choice(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ROUTERS)


@pytest.mark.parametrize(
    "flags, flag, router",
    [
        (["--top-p", "0.3"], "--top-p", "top_k"),  # the default router
        (["--router", "top_p", "--k", "2"], "--k", "top_p"),
        (["--router", "top_k", "--adaptive-threshold", "0.2"], "--adaptive-threshold", "top_k"),
        (["--router", "adaptive", "--gw-threshold", "0.5"], "--gw-threshold", "adaptive"),
        (["--router", "noisy_top_k", "--renormalize"], "--renormalize", "noisy_top_k"),
        (["--router", "gw", "--max-experts", "2"], "--max-experts", "gw"),
    ],
)
def test_a_flag_of_another_router_is_refused(flags, flag, router, capsys):
    err = refused(["train", *flags, *TINY], capsys)
    assert f"{flag} does not apply to --router {router}" in err


@pytest.mark.parametrize(
    "flags, text",
    [
        (["--router", "top_p", "--top-p", "1.5"], "--top-p 1.5: p must be"),
        (
            ["--router", "adaptive", "--adaptive-threshold", "2"],
            "--adaptive-threshold 2.0: threshold must be",
        ),
        (["--router", "gw", "--gw-threshold", "1.2"], "--gw-threshold 1.2: threshold must be"),
        (["--k", "5"], "k=5"),  # more experts per token than the 4 experts
    ],
)
def test_a_value_the_router_refuses_names_the_flag(flags, text, capsys):
    assert text in refused(["train", *TINY, *flags], capsys)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--balance-coef", "nan"),
        ("--balance-coef", "-0.1"),
        ("--z-coef", "-1"),
        ("--z-coef", "inf"),
        ("--dynamic-coef", "nan"),
        ("--dynamic-coef", "-1e-4"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--lr", "-3e-3"),
        ("--capacity-factor", "0"),
        ("--capacity-factor", "nan"),
        ("--top-p", "-0.4"),
        ("--k", "0"),
        ("--k", "1.5"),
        ("--experts", "-1"),
        ("--steps", "-3"),
        ("--batch-size", "0"),
        ("--adaptive-threshold", "nan"),
        ("--gw-max-slots", "-1"),
    ],
)
def test_numbers_out_of_range_are_refused_by_argparse(flag, value, capsys):
    err = refused(
        ["train", *TINY, f"{flag}={value}"], capsys
    )  # "=": argparse reads -1e-4 as a flag
    assert f"argument {flag}: must be" in err and repr(value) in err


@pytest.mark.parametrize("command", ["topp", "adaptive", "compare", "gw"])
def test_the_course_commands_check_their_numbers_too(command, capsys):
    assert "argument --lr: must be a number > 0, got 'nan'" in refused(
        [command, "--lr", "nan"], capsys, course_main
    )


def test_gw_router_trains_from_the_command_line(capsys):
    summary = main(["train", *TINY, "--router", "gw", "--gw-threshold", "0.5"])
    assert len(summary["experts_per_token"]) == 1
    assert "train loss" in capsys.readouterr().out


def test_layer_flags_for_shared_experts_and_the_sequence_loss():
    argv = [*"--shared-hidden 32 --shared-gate --seq-balance-coef 1e-4".split()]
    config = cli.moe_config_from_args(parse(argv))
    assert (config.shared_hidden, config.shared_gate, config.seq_balance_coef) == (32, True, 1e-4)


def test_a_sigmoid_flag_for_top_k_is_refused(capsys):
    err = refused(["train", *TINY, "--bias-rate", "0.01"], capsys)
    assert "--bias-rate does not apply to --router top_k" in err


def test_train_help_has_a_description_and_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Train the tiny MoE transformer" in text
    for default in ("training data (default: text)", "optimizer steps (default: 300)"):
        assert default in text
    assert "AdamW learning rate (default: 0.003)" in text
    assert "(default: None)" not in text, "an option not given shows no default"


def test_train_says_what_it_runs_before_the_progress_bar(capsys):
    main(["train", *TINY])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("model: ") and "parameters" in first and "device cpu" in first
    assert "torch threads: " in first and "roughly" in first and "2 steps of 64 tokens" in first


def test_readme_lists_every_router_name():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("`--router` is a name of"))
    start = readme.index(line)
    listed = readme[start : readme.index(")", start)]
    assert all(f"`{name}`" in listed for name in ROUTERS), sorted(ROUTERS)


def test_zero_steps_is_refused_not_reported_as_a_nan_loss(capsys):
    assert "argument --steps: must be an int >= 1, got '0'" in refused(
        ["train", *TINY, "--steps", "0"], capsys
    )


def test_block_size_with_multitask_data_is_refused_not_ignored(capsys):
    err = refused(["train", *TINY, "--data", "multitask"], capsys)  # TINY gives --block-size
    assert "--block-size applies to --data text" in err


def test_moe_every_past_the_layers_is_refused_naming_both_flags(capsys):
    err = refused(["train", *TINY, "--moe-every", "3"], capsys)  # TINY: --layers 1
    assert "--moe-every 3 with --layers 1 builds no MoE layer" in err


@pytest.mark.parametrize(
    "command", ["testbed", "compare", "topp", "adaptive", "text", "modern", "balance_scope"]
)
def test_a_seed_given_twice_is_refused(command, capsys):
    err = refused([command, "--seeds", "0", "1", "0"], capsys, course_main)
    assert "--seeds: each seed once, got [0] more than once" in err


@pytest.mark.parametrize(
    "command, flag",
    [
        ("gw", "--threads"),
        ("compare", "--threads"),
        ("compare", "--eval-windows"),
        ("compare", "--block-size"),
        ("modern", "--eval-windows"),
        ("text", "--eval-windows"),
        ("testbed", "--n-test"),
    ],
)
def test_a_zero_that_would_be_ignored_or_divide_is_refused(command, flag, capsys):
    err = refused([command, flag, "0"], capsys, course_main)
    assert f"argument {flag}: must be an int >= 1, got '0'" in err


def test_zero_stays_allowed_where_it_means_something():
    from course import testbed

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    testbed.add_parser(sub)
    assert parser.parse_args(["testbed", "--task-seed", "0"]).task_seed == 0


def test_fine_tuning_no_steps_is_refused_by_argparse(capsys):
    err = refused(["compare", "--finetune-steps", "0"], capsys, course_main)
    assert "argument --finetune-steps: must be an int >= 1, got '0'" in err
