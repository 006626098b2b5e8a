"""Generation with tools outside the trainer, for the held-out evaluation of a policy that calls tools.

It follows TRL's tool loop in training: each row gets its own environment from the run's `environment_factory`,
reset with the row; completions are parsed with the tokenizer's response schema; a completion whose last message
calls tools has its calls run, and the row generates again with the tool replies (and the images they return) in
the conversation, until it answers without a call or `max_turns` tool turns have run. The generated tokens of all
turns together stay within `max_new_tokens`, as a training completion stays within `max_completion_length`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from vlm_rl.models.inputs import conversation_text

GenerateTurn = Callable[[list[list[dict]], list[list], list, int], tuple[list[str], list[list[int]], list[list[int]]]]
"""`(conversations, images, tools, max_new_tokens) -> (texts, token ids, prompt token ids)`: one turn for a batch."""


def tool_methods(environment: Any) -> dict[str, Callable]:
    """An environment's tools as TRL lists them: its public methods, less `reset` and `get_reward`."""
    return {
        name: getattr(environment, name)
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    }


def run_calls(tools: dict[str, Callable], message: dict) -> list[dict]:
    """The tool messages that answer the calls of an assistant `message`, built as TRL's loop builds them."""
    replies = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        name = function.get("name", "unknown")
        try:
            if call.get("type") != "function":
                raise ValueError(f"Unsupported tool call type: {call.get('type')}")
            if name not in tools:
                raise ValueError(f"Tool {name} not found.")
            result = tools[name](**(function.get("arguments") or {}))
        except Exception as error:
            result = {"error": str(error)}
        replies.append({"role": "tool", "name": name, "content": result if isinstance(result, list) else str(result)})
    return replies


def generate_with_tools(
    generate_turn: GenerateTurn,
    tokenizer: Any,
    prompts: list[list[dict]],
    images: list[list],
    rows: list[dict],
    environment_factory: Callable[[], Any],
    *,
    max_turns: int | None,
    max_new_tokens: int,
) -> tuple[list[list[dict]], list[list[int]], list[str]]:
    """Each row's completion as messages (assistant turns, parsed, and the tool replies between them), the ids of
    the tokens it generated over every turn, and the whole exchange as text (`conversation_text`)."""
    from trl.chat_template_utils import add_response_schema, parse_response  # lazy: TRL is slow to import

    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        add_response_schema(tokenizer)
    environments = [environment_factory() for _ in rows]
    for environment, row in zip(environments, rows, strict=True):
        environment.reset(**row)
    tools = [tool_methods(environment) for environment in environments]
    conversations = [list(prompt) for prompt in prompts]
    completions: list[list[dict]] = [[] for _ in rows]
    generated: list[list[int]] = [[] for _ in rows]
    active, turns = list(range(len(rows))), 0
    while active:
        for i in active:  # a call after this turn starts the rollout's next tool turn (`vlm_rl.tools.toolbox`)
            if hasattr(environments[i], "_end_turn"):
                environments[i]._end_turn()
        budget = max_new_tokens - max(len(generated[i]) for i in active)
        texts, ids, prompt_ids = generate_turn(
            [conversations[i] for i in active], [images[i] for i in active], list(tools[active[0]].values()), budget
        )
        calling = []
        for i, text, turn_ids, prefix in zip(active, texts, ids, prompt_ids, strict=True):
            generated[i] += turn_ids
            if turn_ids:
                message = parse_response(tokenizer, turn_ids, prefix=prefix, tools=list(tools[i].values()))
            else:
                message = {"role": "assistant", "content": ""}
            completions[i].append(message)
            # The conversation goes on with the text as generated; the parsed message is what rewards read.
            conversations[i].append({"role": "assistant", "content": text})
            if message.get("tool_calls") and len(generated[i]) < max_new_tokens:
                calling.append(i)
        turns += 1
        if max_turns is not None and turns > max_turns:
            break
        for i in calling:
            replies = run_calls(tools[i], completions[i][-1])
            completions[i] += replies
            conversations[i] += replies
        active = calling
    texts = [
        conversation_text(conversation[len(prompt) :])
        for conversation, prompt in zip(conversations, prompts, strict=True)
    ]
    return completions, generated, texts
