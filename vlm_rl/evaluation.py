"""Held-out evaluation: greedy generation, scored with the recipe's rewards, with and without the right image.

The blind run gives every image row another row's images (a derangement, so no row keeps its own). A
policy that reads the image scores near chance there; one that guesses from the text does not drop.
The frames-shuffled run shows every video row its own frames out of order (a derangement of the frames, so none
keeps its place): a policy that uses the order (which way something moves) drops; one that reads single frames
does not.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from vlm_rl.config import parse_recipe
from vlm_rl.data import image_counts, load_rows
from vlm_rl.data.video import derangement, shuffled_frame_order, with_video
from vlm_rl.errors import InvalidValueError, MissingPathError
from vlm_rl.export import ADAPTER_CONFIG, load_merged
from vlm_rl.models import adapter_for, load_model_and_processor
from vlm_rl.models.inputs import conversation_text, media_token_ids, prompt_inputs
from vlm_rl.prepare import default_max_prompt_length, prepare_data, prepare_rewards
from vlm_rl.rewards.configured import bind_context
from vlm_rl.tools import recipe_toolbox, resolve_tool
from vlm_rl.tools.multiturn import generate_with_tools


def _generate(
    model,
    processor,
    prompts: list,
    images: list[list],
    max_new_tokens: int,
    temperature: float | None = None,
    tools: list | None = None,
):
    """Completions, greedy unless a sampling `temperature` is given: their texts, and their token ids up to and
    including the first end-of-sequence. `tools`: rendered into the prompts, as in training; with them, the
    prompts' token ids come third."""
    adapter = adapter_for(model.config)
    adapter.check_images_per_row([len(row) for row in images])
    inputs = prompt_inputs(adapter, processor, prompts, images, tools).to(model.device)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=temperature is not None,
        # Sampling as GRPO samples: the whole distribution at `temperature`, no top-k or top-p cut.
        **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature is not None else {}),
        suppress_tokens=media_token_ids(model.config),
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = output[:, inputs["input_ids"].size(1) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = [row[: next((i + 1 for i, token in enumerate(row) if token in eos), len(row))] for row in generated]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if tools is None:
        return texts, ids
    # The prompts' own ids (left padding off): parsing a tool call reads the turn's opening from them.
    rows = zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    prompt_ids = [row[mask.bool()].tolist() for row, mask in rows]
    return texts, ids, prompt_ids


def deranged_rows(image_rows: Sequence[int], seed: int = 0) -> dict[int, int]:
    """For each image row, the other image row whose images it gets in a blind evaluation (none keeps its own)."""
    if len(image_rows) < 2:
        raise InvalidValueError("A blind evaluation needs at least two rows with images.")
    return derangement(image_rows, random.Random(seed))


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[tuple[int, dict]]]:
    """(index, row) pairs, one batch at a time: only a batch's images are decoded and held at once."""
    for start in range(0, len(dataset), batch_size):
        yield load_rows(dataset, list(range(start, min(start + batch_size, len(dataset)))))


@torch.no_grad()
def evaluate_policy(
    model,
    processor,
    dataset: Dataset,
    reward_funcs: list[Callable],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    blind: bool = False,
    shuffle_frames: bool = False,
    seed: int = 0,
    progress: str | None = None,
    temperature: float | None = None,
    environment_factory: Callable[[], Any] | None = None,
    max_tool_turns: int | None = None,
) -> list[dict[str, Any]]:
    """Generate for every row, greedily unless a sampling `temperature` is given, and score each completion with
    every reward. With an `environment_factory` (the run's tools) the policy calls tools as in training, for at
    most `max_tool_turns` tool turns, and its completions are the whole exchange (`vlm_rl.tools.multiturn`).

    Returns one record per row: its index, prompt (as text), number of images, `answer` if it has one, the
    completion (as text: with tools, every turn and tool reply), `rewards` by function name and, with tools,
    `tool_calls`; with `blind`, `image_from`, the row whose images it was shown (its tools see those images too);
    with `shuffle_frames`, `frame_order` for each video row: the order its clip's frames were shown in
    (`shuffled_frame_order`).
    Rows load a batch at a time; a lazily loaded dataset's bad rows are left out under `bad_rows: skip`.
    `progress`: the label of a progress bar over the batches (None: no bar).
    """
    was_training = model.training
    model.eval()
    partners = None
    if blind:  # which rows have images: a first pass, so that no more than a batch of images is held
        partners = deranged_rows(image_rows(dataset, batch_size), seed)
    records = []
    batches = tqdm(
        _batches(dataset, batch_size), desc=progress, total=-(-len(dataset) // batch_size), disable=progress is None
    )
    for indexed in batches:
        batch = [row for _, row in indexed]
        if partners is None:
            images = [row.get("images") or [] for row in batch]
        else:
            lent = dict(load_rows(dataset, [partners[index] for index, _ in indexed if index in partners]))
            images = [list(lent[partners[index]]["images"]) if index in partners else [] for index, _ in indexed]
        # A row's video stays its own (a blind evaluation swaps images only); shuffling reorders its frames.
        videos = [row.get("videos") or [] for row in batch]
        if shuffle_frames:
            videos = [
                [clip[shuffled_frame_order(len(clip), index, seed)] for clip in clips]
                for (index, _), clips in zip(indexed, videos, strict=True)
            ]
        if any(videos):
            adapter = adapter_for(model.config)
            adapter.check_videos_per_row([len(clips) for clips in videos])
            adapter.check_video_frames([len(clips[0]) if clips else None for clips in videos])
            if environment_factory is not None:
                raise InvalidValueError("Video rows cannot be evaluated with tools yet; see docs/data.md.")
        prompts = [
            with_video(row["prompt"], clips, len(shown))
            for row, clips, shown in zip(batch, videos, images, strict=True)
        ]
        if environment_factory is None:
            texts, completion_ids = _generate(model, processor, prompts, images, max_new_tokens, temperature)
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions, completion_ids, texts = generate_with_tools(
                lambda conversations, shown, tools, budget: _generate(
                    model, processor, conversations, shown, budget, temperature, tools
                ),
                processor.tokenizer,
                prompts,
                images,
                [{**row, "images": shown} for row, shown in zip(batch, images, strict=True)],
                environment_factory,
                max_turns=max_tool_turns,
                max_new_tokens=max_new_tokens,
            )
        # Same calling convention as in training: every dataset column, as lists over the batch.
        columns = {key: [row[key] for row in batch] for key in batch[0] if key != "prompt"}
        columns["images"] = images
        columns["completion_ids"] = completion_ids
        scores = {func.__name__: func(prompts=prompts, completions=completions, **columns) for func in reward_funcs}
        for i, (index, row) in enumerate(indexed):
            record = {"index": index, "prompt": conversation_text(row["prompt"]), "num_images": len(images[i])}
            record["num_videos"] = len(videos[i])
            if partners is not None and index in partners:
                record["image_from"] = partners[index]
            if shuffle_frames and videos[i]:  # one video per row
                record["frame_order"] = shuffled_frame_order(len(videos[i][0]), index, seed)
            if isinstance(row.get("answer"), str | int | float | list):
                record["answer"] = row["answer"]
            record["completion"] = texts[i]
            record["rewards"] = {name: values[i] for name, values in scores.items()}
            if environment_factory is not None:
                record["tool_calls"] = sum(message["role"] == "tool" for message in completions[i])  # the calls run
            records.append(record)
    model.train(was_training)
    return records


def image_rows(dataset: Dataset, batch_size: int = 32) -> list[int]:
    """Indices of the rows with at least one image (a pass over the rows, a batch of images at a time)."""
    return [index for batch in _batches(dataset, batch_size) for index, row in batch if row.get("images")]


def mean_reward(
    records: list[dict[str, Any]], name: str, *, has_images: bool | None = None, has_videos: bool | None = None
) -> float | None:
    """Mean of reward `name` over the records (only those with/without images or videos, if asked); None if empty."""
    values = [
        r["rewards"][name]
        for r in records
        if (has_images is None or (r["num_images"] > 0) == has_images)
        and (has_videos is None or (r.get("num_videos", 0) > 0) == has_videos)
        and r["rewards"][name] is not None
    ]
    return sum(values) / len(values) if values else None


def summarize(
    records: list[dict[str, Any]],
    blind_records: list[dict[str, Any]] | None,
    reward_names: list[str],
    accuracy_reward: str,
    chance: float | None = None,
    shuffled_records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Each reward's mean and the accuracy, over all rows, rows with images, rows without, rows with a video; and,
    from the run with images swapped between rows (`blind_records`), the same over the rows with images, and how much
    the policy relies on the image: `image_reliance` = `image_accuracy` - `blind_accuracy`; from the run with each
    clip's frames shuffled (`shuffled_records`), the same over the rows with a video, and how much it relies on the
    frames' order: `order_reliance` = `video_accuracy` - `frames_shuffled_accuracy`."""
    summary = {
        "num_rows": len(records),
        "num_image_rows": sum(r["num_images"] > 0 for r in records),
        "accuracy_reward": accuracy_reward,
        "accuracy": mean_reward(records, accuracy_reward),
        "image_accuracy": mean_reward(records, accuracy_reward, has_images=True),
        "text_only_accuracy": mean_reward(records, accuracy_reward, has_images=False),
        "num_video_rows": sum(r.get("num_videos", 0) > 0 for r in records),
        "video_accuracy": mean_reward(records, accuracy_reward, has_videos=True),
        "chance": chance,
        "rewards": {name: mean_reward(records, name) for name in reward_names},
    }
    if blind_records is not None:
        blind = mean_reward(blind_records, accuracy_reward, has_images=True)
        summary["blind_accuracy"] = blind
        image = summary["image_accuracy"]
        summary["image_reliance"] = image - blind if image is not None and blind is not None else None
        summary["blind_rewards"] = {name: mean_reward(blind_records, name, has_images=True) for name in reward_names}
    if shuffled_records is not None:
        shuffled = mean_reward(shuffled_records, accuracy_reward, has_videos=True)
        summary["frames_shuffled_accuracy"] = shuffled
        video = summary["video_accuracy"]
        summary["order_reliance"] = video - shuffled if video is not None and shuffled is not None else None
        summary["frames_shuffled_rewards"] = {
            name: mean_reward(shuffled_records, name, has_videos=True) for name in reward_names
        }
    return summary


def evaluate_and_write(
    model,
    processor,
    dataset: Dataset,
    reward_funcs: list[Callable],
    output_dir: str | Path,
    *,
    accuracy_reward: str,
    max_new_tokens: int,
    batch_size: int = 32,
    ablate_images: bool = True,
    ablate_frames: bool = False,
    chance: float | None = None,
    extra: dict[str, Any] | None = None,
    environment_factory: Callable[[], Any] | None = None,
    max_tool_turns: int | None = None,
) -> dict[str, Any]:
    """Evaluate (and, with `ablate_images`, again with images swapped between rows; with `ablate_frames`, again with
    each clip's frames shuffled); write `eval_samples.jsonl` (one line per row) and `eval_results.json` (the summary,
    plus `extra`) to `output_dir`.
    With an `environment_factory` (the run's tools), the summary adds `tool_calls_per_completion`."""
    names = [func.__name__ for func in reward_funcs]
    if accuracy_reward not in names:
        raise InvalidValueError(
            f"The accuracy reward {accuracy_reward!r} (eval_accuracy_reward) is not among {names}."
        )
    kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    kwargs |= {"environment_factory": environment_factory, "max_tool_turns": max_tool_turns}
    records = evaluate_policy(model, processor, dataset, reward_funcs, progress="eval", **kwargs)
    blind_records = None
    if ablate_images:
        blind_records = evaluate_policy(
            model, processor, dataset, reward_funcs, blind=True, progress="eval, images swapped", **kwargs
        )
    shuffled_records = None
    if ablate_frames:
        if not any(record["num_videos"] for record in records):
            raise InvalidValueError(
                f"--ablate-frames needs a row with a video, but none of the {len(records)} evaluated rows has one: "
                "evaluate a split with video rows, or leave the flag off."
            )
        shuffled_records = evaluate_policy(
            model, processor, dataset, reward_funcs, shuffle_frames=True, progress="eval, frames shuffled", **kwargs
        )
    summary = summarize(records, blind_records, names, accuracy_reward, chance, shuffled_records)
    results = {**summary, **(extra or {})}
    if environment_factory is not None:
        results["tool_calls_per_completion"] = sum(r["tool_calls"] for r in records) / max(len(records), 1)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "eval_samples.jsonl", "w") as f:
        for i, record in enumerate(records):
            if blind_records is not None:  # rows without images keep them (none) in the blind run
                blind = blind_records[i]
                record |= {f"blind_{key}": blind.get(key) for key in ("image_from", "completion", "rewards")}
            if shuffled_records is not None:  # rows without a video are shown the same in the shuffled run
                shuffled = shuffled_records[i]
                record |= {f"shuffled_{key}": shuffled.get(key) for key in ("frame_order", "completion", "rewards")}
            f.write(json.dumps(record, default=str) + "\n")
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def load_evaluated_model(path: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False):
    """A saved model directory (a run's output_dir or checkpoint-N), or a LoRA run's adapter merged into its base."""
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"--model {path} is not a directory: pass a run's output_dir or a checkpoint-N.")
    if (path / ADAPTER_CONFIG).is_file():
        return load_merged(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if not (path / "config.json").is_file():
        raise MissingPathError(f"--model {path} holds no model (no config.json and no {ADAPTER_CONFIG}).")
    return load_model_and_processor(str(path), dtype=dtype, trust_remote_code=trust_remote_code)


def evaluate_saved_model(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """`vlm-rl eval` (arguments: see `vlm_rl.cli`): a saved model on a recipe's data, scored with its rewards."""
    model_args, data_args, reward_args, training_args, recipe_path = parse_recipe(
        ["--config", args.config, *overrides]
    )
    # The rewards and the rows as `vlm-rl train` resolves them (`vlm_rl.prepare`): the same held-out split.
    reward_funcs = prepare_rewards(reward_args, training_args, recipe_path.parent)
    task = prepare_data(data_args, training_args, recipe_path.parent)
    dataset = task.eval if args.split == "eval" else task.train
    if dataset is None:
        raise InvalidValueError(
            f"Recipe {args.config} has no held-out data: set eval_dataset, eval_split or eval_size (in the recipe or "
            "as a flag, e.g. --eval_dataset data/test.jsonl), or pass --split train."
        )
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    model, processor = load_evaluated_model(
        args.model, dtype=model_args.dtype, trust_remote_code=training_args.trust_remote_code
    )
    adapter_for(model.config).check_images_per_row(*image_counts(dataset))
    task.attach_processor(processor, default_max_prompt_length(data_args, training_args, model.config))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    max_new_tokens = args.max_new_tokens or training_args.max_completion_length
    bind_context(
        reward_funcs,
        processing_class=processor,
        model_type=model.config.model_type,
        max_completion_length=max_new_tokens,
    )
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.model) / "eval"
    results = evaluate_and_write(
        model,
        processor,
        dataset,
        reward_funcs,
        output_dir,
        accuracy_reward=training_args.eval_accuracy_reward,
        max_new_tokens=max_new_tokens,
        batch_size=args.batch_size or training_args.per_device_eval_batch_size,
        ablate_images=args.ablate_images,
        ablate_frames=args.ablate_frames,
        chance=task.chance,
        extra={"model": str(args.model), "recipe": str(args.config), "split": args.split},
        environment_factory=recipe_toolbox(
            [resolve_tool(spec, recipe_path.parent) for spec in training_args.tools],
            processor,
            model.config.model_type,
            training_args.max_tool_turns,
        ),
        max_tool_turns=training_args.max_tool_calling_iterations,
    )
    shown = ("accuracy", "image_accuracy", "blind_accuracy", "image_reliance", "video_accuracy",
             "frames_shuffled_accuracy", "order_reliance", "chance", "tool_calls_per_completion")  # fmt: skip
    print(json.dumps({key: results[key] for key in shown if key in results}))
    print(f"Wrote {output_dir / 'eval_results.json'} and {output_dir / 'eval_samples.jsonl'}")
    return results
