"""The reward registry, the built-in rewards, and loading user rewards from a recipe's names."""

import textwrap

import pytest
from conftest import no_hang

from vlm_rl.rewards import REWARD_REGISTRY, RewardSpecError, load_rewards, register_reward, resolve_reward
from vlm_rl.rewards.parsing import extract_answer, tagged_blocks


def as_chat(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_builtins_are_registered_under_their_logged_names():
    for name in ("accuracy", "think_answer_format"):
        # TRL logs each reward as rewards/<__name__>/mean; the recipe name and the logged name agree.
        assert REWARD_REGISTRY[name].__name__ == name


def test_accuracy_reads_answer_tags_or_whole_completion():
    accuracy = resolve_reward("accuracy")
    completions = as_chat(
        "<think>it is red</think><answer> Red. </answer>",  # tags, case and full stop ignored
        "blue",  # no tags: the whole completion is the answer
        "<answer>red</answer> <answer>blue</answer>",  # the last answer counts
        "red or blue",  # hedging is not an exact match
        "",
    )
    scores = accuracy(prompts=[None] * 5, completions=completions, answer=["red", "blue", "blue", "red", "red"])
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0]
    # Plain-text completions work the same way.
    assert accuracy(prompts=["q"], completions=["<answer>7</answer>"], answer=["7"]) == [1.0]


def test_multi_turn_completions_are_scored_on_the_models_turns_only():
    accuracy = resolve_reward("accuracy")
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "zoom_in"}}],
    }
    reply = [{"type": "image", "image": None}, {"type": "text", "text": "<answer>red</answer>"}]
    completions = [
        [call, {"role": "tool", "name": "zoom_in", "content": reply}, {"role": "assistant", "content": "blue"}],
        [call, {"role": "tool", "name": "zoom_in", "content": "red"}, {"role": "assistant", "content": "red"}],
    ]
    # The tool's reply holds the right answer in the first completion; the model's own answer is wrong.
    assert accuracy(prompts=[None] * 2, completions=completions, answer=["red", "red"]) == [0.0, 1.0]


def test_a_parsed_reasoning_block_counts_for_the_format(load_tiny):
    """With tools, TRL parses completions with the template's response schema; Qwen3's moves `<think>…</think>` into
    `reasoning_content`. The format reward still sees the block the model wrote."""
    from trl.chat_template_utils import add_response_schema, parse_response, qwen3_vl_chat_template

    _, processor = load_tiny("qwen3_vl")
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    tokenizer = add_response_schema(processor).tokenizer
    ids = tokenizer.encode("<think>a red dot</think><answer>red</answer><|im_end|>", add_special_tokens=False)
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True)
    message = parse_response(tokenizer, ids, prefix=prefix)
    assert message["reasoning_content"] == "a red dot" and "<think>" not in message["content"]
    assert resolve_reward("think_answer_format")(prompts=[None], completions=[[message]]) == [1.0]


def test_accuracy_without_answer_column_names_it():
    with pytest.raises(KeyError, match="'answer' column"):
        resolve_reward("accuracy")(prompts=["q"], completions=["x"], solution=["x"])


def test_think_answer_format_is_strict():
    fmt = resolve_reward("think_answer_format")
    completions = as_chat(
        "<think>look</think>\n<answer>red</answer>",
        "<answer>red</answer>",  # no thinking
        "<think>a</think><answer>red</answer> trailing",  # text after the answer
        "<think>a</think><answer>red</answer><answer>blue</answer>",  # two answers
        "<think><think>a</think><answer>x</answer>",  # nested think
    )
    assert fmt(completions=completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_register_reward_rejects_a_second_function_under_the_same_name():
    @register_reward("test_only_constant")
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    assert resolve_reward("test_only_constant") is constant
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_only_constant")(lambda completions, **kwargs: [0.0])


def test_user_reward_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_lab_rewards.py").write_text(
        textwrap.dedent(
            """
            def short(completions, **kwargs):
                return [1.0 if len(c[0]["content"]) < 5 else 0.0 for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (short,) = load_rewards(["my_lab_rewards:short"])
    assert short(prompts=["q", "q"], completions=as_chat("ok", "far too long")) == [1.0, 0.0]


def test_user_reward_by_file_path_relative_to_recipe(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipes"
    (recipe_dir / "rewards").mkdir(parents=True)
    (recipe_dir / "rewards" / "lab.py").write_text(
        "def mentions_red(completions, answer, **kwargs):\n"
        "    return [float('red' in c[0]['content']) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)  # the recipe directory is searched before the working directory
    (mentions_red,) = load_rewards(["rewards/lab.py:mentions_red"], base_dir=recipe_dir)
    assert mentions_red(prompts=["q", "q"], completions=as_chat("a red one", "blue"), answer=["red", "red"]) == [
        1.0,
        0.0,
    ]
    # An absolute path works from anywhere.
    (again,) = load_rewards([f"{recipe_dir}/rewards/lab.py:mentions_red"])
    assert again.__name__ == "mentions_red"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acuracy", r"Unknown reward 'acuracy'\. Did you mean 'accuracy'\?"),
        ("missing/rewards.py:f", r"file 'missing/rewards\.py' not found"),
        ("no_such_module_xyz:f", r"module 'no_such_module_xyz' cannot be imported"),
        ("vlm_rl.rewards.accuracy:acuracy", r"has no function 'acuracy'\. Did you mean 'accuracy'\?"),
        ("vlm_rl.rewards.accuracy:", r"no function name after ':'"),
    ],
)
def test_bad_reward_specs_name_what_is_wrong(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        load_rewards([spec])


def test_reward_file_that_fails_to_import_names_the_file(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_package_xyz\n")
    with pytest.raises(RewardSpecError, match=r"importing .*broken\.py failed"):
        load_rewards([f"{broken}:f"])


def test_empty_reward_list_is_an_error():
    with pytest.raises(RewardSpecError, match="no rewards"):
        load_rewards([])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>a</answer>", "a"),
        ("think <answer> a </answer> more <answer>b</answer>", "b"),
        ("<answer>a<answer>b</answer>", "a<answer>b"),
        ("no tags", "no tags"),
        ("<answer>unclosed", "<answer>unclosed"),
        ("</answer>only close", "</answer>only close"),
        ("<answer></answer>", ""),
        ("<answer>x</answer> trailing <answer>unclosed", "x"),
    ],
)
def test_extract_answer_takes_the_last_complete_block(text, expected):
    assert extract_answer(text) == expected


def test_answer_extraction_is_linear_on_repeated_unclosed_tags():
    with no_hang():
        assert extract_answer("<answer>" * 200_000).startswith("<answer>")
        assert tagged_blocks("<answer>" * 200_000 + "x</answer>", "answer") == ["<answer>" * 199_999 + "x"]
