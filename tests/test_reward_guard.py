"""How rewards are configured and called: routing, recipe kwargs, entry points, time limits, failure isolation."""

import asyncio
import logging
import math
import textwrap
import time

import pytest
from conftest import no_hang, small_config
from datasets import Dataset

from vlm_rl.data import make_grounding_math_dataset
from vlm_rl.prepare import check_routes, reward_weights
from vlm_rl.rewards import (
    ConfiguredReward,
    RewardError,
    RewardSpecError,
    RewardTimeout,
    load_rewards,
    resolve_reward,
    time_limit,
)
from vlm_rl.rewards.columns import check_reward_columns
from vlm_rl.trainers import VLMGRPOTrainer


def batch(*tasks):
    """A batch in TRL's calling convention: one prompt/completion per task, with `task` and `answer` columns."""
    n = len(tasks)
    return {
        "prompts": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "completions": [[{"role": "assistant", "content": f"c{i}"}] for i in range(n)],
        "task": list(tasks),
        "answer": [f"a{i}" for i in range(n)],
    }


def test_routing_calls_the_function_on_its_rows_only_and_leaves_the_others_unscored():
    seen = []

    def grounding_only(prompts, completions, task, answer, **kwargs):
        seen.append((list(task), list(answer), [c[0]["content"] for c in completions]))
        return [1.0] * len(completions)

    reward = ConfiguredReward(grounding_only, name="g", tasks=["grounding"])
    scores = reward(**batch("math", "grounding", "math", "grounding"))
    assert scores == [None, 1.0, None, 1.0]
    # The function saw exactly the routed rows, with their own columns, in order.
    assert seen == [(["grounding", "grounding"], ["a1", "a3"], ["c1", "c3"])]
    # No routed row in the batch: the function is not called at all.
    assert reward(**batch("math")) == [None]
    assert len(seen) == 1


def test_routing_needs_the_route_column():
    reward = ConfiguredReward(lambda prompts, completions, **kw: [1.0] * len(completions), name="r", tasks=["x"])
    columns = batch("x")
    del columns["task"]
    with pytest.raises(KeyError, match="routed to tasks \\['x'\\].*no 'task' column"):
        reward(**columns)


def test_log_extra_gets_one_value_per_sample_of_the_whole_batch():
    logged = {}

    def with_extra(prompts, completions, log_extra, **kwargs):
        log_extra("parsed", [f"p{i}" for i in range(len(completions))])
        return [0.5] * len(completions)

    reward = ConfiguredReward(with_extra, name="e", tasks=["b"])
    reward(**batch("a", "b", "a", "b"), log_extra=lambda column, values: logged.update({column: values}))
    assert logged == {"parsed": [None, "p0", None, "p1"]}


def test_a_retried_call_logs_once_per_sample_and_only_what_succeeded():
    logged, metrics = {}, []

    def logs_then_fails(prompts, completions, answer, log_extra, log_metric, **kwargs):
        log_extra("seen", list(answer))
        log_metric("calls", 1.0)
        if "a1" in answer:
            raise ValueError("a1 is bad")
        return [1.0] * len(completions)

    reward = ConfiguredReward(logs_then_fails, name="logs")
    scores = reward(
        **batch("t", "t", "t"),
        log_extra=lambda column, values: logged.setdefault(column, []).append(values),
        log_metric=lambda name, value: metrics.append(name),
    )
    assert scores == [1.0, None, 1.0]
    # The failed batch attempt and the failed row logged nothing; the two rows that succeeded logged once.
    assert logged == {"seen": [["a0", None, "a2"]]}
    assert metrics == ["calls", "calls"]


def test_routes_compare_as_text_so_integer_task_columns_work():
    (reward,) = load_rewards([{"reward": "accuracy", "tasks": [1]}])
    columns = batch("x", "x")
    columns["task"] = [1, 2]
    columns["completions"] = [[{"role": "assistant", "content": "a0"}]] * 2
    assert reward(**columns) == [1.0, None]


def test_recipe_kwargs_reach_the_function_and_typos_are_rejected_at_load(tmp_path):
    (tmp_path / "lab.py").write_text(
        textwrap.dedent(
            """
            def scaled(prompts, completions, *, scale=1.0, **kwargs):
                return [scale] * len(completions)
            """
        )
    )
    (reward,) = load_rewards([{"reward": "lab.py:scaled", "kwargs": {"scale": 3.0}}], base_dir=tmp_path)
    assert reward.__name__ == "scaled"
    assert reward(**batch("t", "t")) == [3.0, 3.0]
    with pytest.raises(RewardSpecError, match=r"reward_funcs\[0\].*no keyword parameter 'scal'.*Did you mean 'scale'"):
        load_rewards([{"reward": "lab.py:scaled", "kwargs": {"scal": 3.0}}], base_dir=tmp_path)
    # A kwarg with a dataset column's name would be ambiguous.
    (clash,) = load_rewards([{"reward": "lab.py:scaled", "kwargs": {"scale": 2.0}}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="same names as dataset columns"):
        clash(**batch("t"), scale=["column"])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"reward": "accuracy", "wieght": 2}, "unknown key 'wieght'.*Did you mean 'weight'"),
        ({"name": "x"}, "`reward` .* is required"),
        ({"reward": "accuracy", "tasks": []}, "`tasks` must be a non-empty list"),
        ({"reward": "accuracy", "timeout": -1}, "`timeout` must be a positive number"),
        ({"reward": "accuracy", "weight": "heavy"}, "`weight` must be a finite number"),
        ({"reward": "accuracy", "name": "a/b"}, "`name` must be a non-empty string without '/'"),
        (["accuracy"], "must be a reward reference or a mapping"),
        ("{reward: accuracy, tasks: [", "is not a valid mapping"),
    ],
)
def test_bad_reward_entries_name_the_entry_and_the_key(entry, message):
    with pytest.raises(RewardSpecError, match=r"reward_funcs\[1\].*" + message):
        load_rewards(["accuracy", entry])


def test_entries_as_yaml_strings_from_the_command_line_and_distinct_names():
    rewards = load_rewards(["accuracy", "{reward: accuracy, name: acc_math, tasks: [math], weight: 0.5}"])
    assert [r.__name__ for r in rewards] == ["accuracy", "acc_math"]
    assert rewards[1].tasks == ["math"]
    with pytest.raises(RewardSpecError, match=r"reward_funcs\[1\].*logged as 'accuracy'.*distinct `name`"):
        load_rewards(["accuracy", {"reward": "accuracy"}])


def test_weights_come_from_the_entries_or_the_recipe_not_both():
    plain = load_rewards(["accuracy", {"reward": "accuracy", "name": "b"}])
    assert reward_weights(plain, None) is None
    assert reward_weights(plain, [1.0, 2.0]) == [1.0, 2.0]
    weighted = load_rewards(["accuracy", {"reward": "accuracy", "name": "b", "weight": 0.25}])
    assert reward_weights(weighted, None) == [1.0, 0.25]
    with pytest.raises(RewardSpecError, match="both `reward_weights` and a `weight`"):
        reward_weights(weighted, [1.0, 1.0])


def test_routes_are_checked_against_the_training_rows():
    data = make_grounding_math_dataset(20)
    ok = load_rewards(
        [{"reward": "accuracy", "tasks": ["math"]}, {"reward": "accuracy", "name": "g", "tasks": ["grounding"]}]
    )
    check_routes(ok, data, "task")
    typo = load_rewards([{"reward": "accuracy", "tasks": ["grouding"]}])
    with pytest.raises(RewardSpecError, match=r"routed to tasks \['grouding'\].*holds \['grounding', 'math'\]"):
        check_routes(typo, data, "task")
    uncovered = load_rewards([{"reward": "accuracy", "tasks": ["math"]}])
    with pytest.raises(RewardSpecError, match=r"task \['grounding'\] are scored by no reward"):
        check_routes(uncovered, data, "task")
    # A reward without `tasks` scores every row, so nothing is left unscored.
    check_routes([*uncovered, *load_rewards([{"reward": "accuracy", "name": "all"}])], data, "task")
    with pytest.raises(RewardSpecError, match="no 'kind' column"):
        check_routes(ok, data, "kind")


def test_a_raising_sample_costs_only_its_own_score_and_is_reported_once(caplog):
    def picky(prompts, completions, answer, **kwargs):
        if "a2" in answer:
            raise ZeroDivisionError("cannot score a2")
        return [1.0] * len(completions)

    reward = ConfiguredReward(picky, name="picky")
    with caplog.at_level(logging.WARNING, logger="vlm_rl.rewards.configured"):
        assert reward(**batch("m", "m", "g", "m")) == [1.0, 1.0, None, 1.0]
        assert reward(**batch("m", "m", "g")) == [1.0, 1.0, None]
    assert reward.failures == {"error": 2}
    reports = [r for r in caplog.records if "picky" in r.getMessage()]
    assert len(reports) == 1  # reported once, then counted
    message = reports[0].getMessage()
    assert "Reward 'picky' failed on sample 2 (task 'g') [error]: cannot score a2" in message
    assert reports[0].exc_info is not None  # with the traceback

    zero = ConfiguredReward(picky, name="picky", error_policy="zero")
    assert zero(**batch("m", "m", "g")) == [1.0, 1.0, 0.0]
    strict = ConfiguredReward(picky, name="picky", error_policy="raise")
    with pytest.raises(RewardError, match="'picky' failed on sample 2 .*cannot score a2"):
        strict(**batch("m", "m", "g"))


def test_a_raising_reward_prints_its_traceback_once_per_exception_type(caplog):
    def broken(prompts, completions, answer, **kwargs):
        if "a3" in answer:
            raise KeyError("no such thing")
        return [1 / 0 for _ in completions]

    reward = ConfiguredReward(broken, name="broken")
    with caplog.at_level(logging.WARNING, logger="vlm_rl.rewards.configured"):
        for _ in range(3):
            assert reward(**batch("m", "m", "m")) == [None, None, None]
        assert reward(**batch("m", "m", "m", "m")) == [None] * 4
    assert reward.failures == {"error": 13}
    # Each exception type once, with one traceback (the failed batch call's is not chained to the row's).
    assert caplog.text.count("Traceback (most recent call last)") == 2
    assert caplog.text.count("ZeroDivisionError: division by zero") == 1
    assert caplog.text.count("KeyError: 'no such thing'") == 1
    assert "During handling of the above exception" not in caplog.text


@pytest.mark.parametrize(
    ("value", "kind"), [(math.nan, "nonfinite"), (math.inf, "nonfinite"), ("1.0", "error"), ([1.0], "error")]
)
def test_nan_inf_and_non_numbers_are_failures(value, kind):
    reward = ConfiguredReward(lambda prompts, completions, **kw: [1, value, None], name="odd")
    assert reward(**batch("t", "t", "t")) == [1.0, None, None]
    assert reward.failures == {kind: 1}


def test_numpy_and_torch_scalars_are_numbers():
    import numpy as np
    import torch

    reward = ConfiguredReward(
        lambda prompts, completions, **kw: [np.float32(0.5), torch.tensor(0.25), True], name="scalars"
    )
    assert reward(**batch("t", "t", "t")) == [0.5, 0.25, 1.0]


def test_a_wrong_number_of_scores_is_a_contract_error_even_by_default():
    reward = ConfiguredReward(lambda prompts, completions, **kw: [1.0], name="short")
    with pytest.raises(RewardError, match="'short' returned 1 values for 3 completions"):
        reward(**batch("t", "t", "t"))
    reward = ConfiguredReward(lambda prompts, completions, **kw: 1.0, name="scalar")
    with pytest.raises(RewardError, match="returned a float for 1 completions"):
        reward(**batch("t"))


def test_a_hanging_reward_is_cut_off_at_its_timeout():
    def hangs(prompts, completions, **kwargs):
        time.sleep(30)
        return [1.0] * len(completions)

    reward = ConfiguredReward(hangs, name="hangs", timeout=0.2)
    with no_hang(10):
        assert reward(**batch("t", "t")) == [None, None]
    assert reward.failures == {"timeout": 2}
    with pytest.raises(
        RewardError,
        match=r"'hangs' failed on sample 0 \(task 't'\) \[timeout\]: the call ran past its time limit of 0.2 s",
    ):
        ConfiguredReward(hangs, name="hangs", timeout=0.2, error_policy="raise")(**batch("t"))


def test_retries_share_the_calls_time_limit():
    def slow_and_failing(prompts, completions, **kwargs):
        time.sleep(0.2)
        raise RuntimeError("down")

    reward = ConfiguredReward(slow_and_failing, name="slow", timeout=0.5)
    with no_hang(10):  # alone, the batch call and its 8 row retries would take 1.8 s
        assert reward(**batch(*"t" * 8)) == [None] * 8
    assert reward.failures["timeout"] > 0
    assert reward.failures["error"] + reward.failures["timeout"] == 8


def test_async_rewards_work_where_an_event_loop_is_already_running():
    class LoopBound:
        """Like an async HTTP client: usable only on the loop it was first used on."""

        loop = None

        async def __call__(self, prompts, completions, **kwargs):
            current = asyncio.get_running_loop()
            self.loop = self.loop or current
            return [1.0 if current is self.loop else 0.0] * len(completions)

    reward = ConfiguredReward(LoopBound(), name="bound")

    async def host():  # a notebook or an async application
        return reward(**batch("t")), reward(**batch("t"))

    assert asyncio.run(host()) == ([1.0], [1.0])


def test_async_rewards_are_awaited_and_time_limited():
    async def judged(prompts, completions, **kwargs):
        await asyncio.sleep(0.01)
        return [0.5] * len(completions)

    async def stuck(prompts, completions, **kwargs):
        await asyncio.sleep(30)

    assert ConfiguredReward(judged, name="judged")(**batch("t", "t")) == [0.5, 0.5]
    reward = ConfiguredReward(stuck, name="stuck", timeout=0.2)
    assert reward(**batch("t")) == [None]
    assert reward.failures == {"timeout": 1}


def test_time_limits_nest_without_extending_or_cancelling_the_outer_one():
    with pytest.raises(RewardTimeout, match="outer"), time_limit(0.5, what="outer"):
        with time_limit(0.1, what="inner"):
            pass  # the inner limit ends early; the outer must still fire
        with time_limit(30, what="long inner"):  # cannot extend the outer limit
            time.sleep(30)
    with pytest.raises(RewardTimeout, match="inner"), time_limit(5, what="outer"), time_limit(0.1, what="inner"):
        time.sleep(5)
    with time_limit(None):  # no limit
        time.sleep(0.01)


def test_rewards_from_an_installed_packages_entry_points(tmp_path, monkeypatch):
    # What `pip install` of a package declaring `[project.entry-points."vlm_rl.rewards"]` leaves on sys.path.
    (tmp_path / "lab_rewards.py").write_text(
        "def brevity(prompts, completions, *, limit=3, **kwargs):\n"
        "    return [float(len(c[0]['content']) <= limit) for c in completions]\n"
    )
    info = tmp_path / "lab_rewards-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-rewards\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[vlm_rl.rewards]\nbrevity = lab_rewards:brevity\nbroken = lab_rewards:missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = load_rewards([{"reward": "brevity", "kwargs": {"limit": 2}}])
    assert reward(**batch("t", "t", "t", "t", "t", "t", "t", "t", "t", "t", "t")) == [1.0] * 10 + [0.0]
    with pytest.raises(RewardSpecError, match="'broken': the 'vlm_rl.rewards' entry point from lab-rewards"):
        resolve_reward("broken")
    with pytest.raises(RewardSpecError, match="Did you mean 'brevity'.*entry points: \\['brevity', 'broken'\\]"):
        resolve_reward("brevty")


# --- the columns a reward needs, checked before training -------------------------------------------------------


def test_a_builtin_reward_without_its_answer_column_fails_naming_the_fix():
    rewards = load_rewards(["accuracy", "think_answer_format"])
    with pytest.raises(RewardSpecError) as error:
        check_reward_columns(rewards, ["prompt", "images", "solution"])
    message = str(error.value)
    assert "\n" not in message
    assert "Reward 'accuracy' needs a dataset column 'answer'" in message
    assert "['prompt', 'images', 'solution']" in message and "column_mapping: {solution: answer}" in message


def test_a_custom_reward_with_a_typo_in_a_column_parameter_is_named():
    def exact(prompts, completions, anwser, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(
        RewardSpecError, match=r"Reward 'exact' needs a dataset column 'anwser'.*Did you mean 'answer'"
    ):
        check_reward_columns([ConfiguredReward(exact, name="exact")], ["prompt", "answer"])

    # Trainer-given names, recipe kwargs, defaults and **kwargs are never columns.
    def given(prompts, completions, completion_ids, trainer_state, processing_class, model_type, scale, tag="x"):
        return [0.0] * len(completions)

    check_reward_columns([ConfiguredReward(given, name="given", kwargs={"scale": 2})], ["prompt"])
    check_reward_columns([ConfiguredReward(lambda prompts, completions, **kwargs: [], name="kw")], ["prompt"])


def test_a_routed_reward_needs_its_column_filled_on_its_own_tasks_rows_only():
    data = Dataset.from_dict({"prompt": ["p"] * 3, "task": ["math", "math", "caption"], "answer": ["1", "2", None]})
    check_reward_columns(load_rewards([{"reward": "accuracy", "tasks": ["math"]}]), data)
    with pytest.raises(RewardSpecError, match=r"'accuracy' is routed to tasks \['caption'\].*'answer' is empty"):
        check_reward_columns(load_rewards([{"reward": "accuracy", "tasks": ["caption"]}]), data)
    # A split with no row of the reward's tasks (a held-out split drawn without them) has nothing to score.
    check_reward_columns(load_rewards([{"reward": "accuracy", "tasks": ["grounding"]}]), data, split="held-out")


def test_the_trainer_checks_reward_columns_before_loading_the_model(tmp_path):
    def exact(prompts, completions, anwser):
        return [0.0] * len(completions)

    data = make_grounding_math_dataset(4)
    with pytest.raises(RewardSpecError, match=r"'anwser', which the held-out data lacks"):
        VLMGRPOTrainer(
            model=str(tmp_path / "never_loaded"),
            reward_funcs=[resolve_reward("accuracy"), exact],
            args=small_config(tmp_path),
            train_dataset=data.add_column("anwser", data["answer"]),
            eval_dataset={"held": data},
        )
