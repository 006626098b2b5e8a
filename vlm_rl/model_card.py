"""The README.md saved with a trained model: what it was trained from, on what, with which rewards, and how it did.

TRL's own card describes a text-generation model with an unknown base; this one replaces it at the end of a run.
Values of fields whose names suggest a secret (`hub_token`, `*_key`, `*password*`) are never written.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import yaml

from vlm_rl.redaction import redacted_mapping

# The training log keys shown in the card's results, when the run logged them.
TRAINING_KEYS = ("reward", "accuracy", "completions/mean_length", "kl", "entropy")


def redacted(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe with secrets' values replaced at any depth (`vlm_rl.redaction`), and without `env`."""
    return {key: value for key, value in redacted_mapping(recipe).items() if key != "env"}


def _plain(value: Any) -> Any:
    """A value YAML can write: enums by value, other objects as strings."""
    if isinstance(value, enum.Enum):  # before `str`: TrainingArguments' strategies are `str` enums
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return getattr(value, "value", str(value))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "–" if value is None else str(value)


def _last_logged(log_history: list[dict], key: str) -> tuple[int, Any] | None:
    for entry in reversed(log_history):
        if isinstance(entry.get(key), int | float):
            return entry.get("step"), entry[key]
    return None


def render_model_card(
    *,
    name: str,
    base_model: str,
    reward_rows: list[dict[str, Any]],
    data: dict[str, Any],
    log_history: list[dict],
    eval_results: dict[str, Any] | None,
    recipe: dict[str, Any],
    versions: dict[str, str],
    has_plot: bool,
    lora_adapter: bool = False,
    resolved: dict[str, str] | None = None,
    recipe_dir: str | None = None,
) -> str:
    """The card's Markdown. `lora_adapter`: the directory holds a LoRA adapter, not a full model; `resolved`: what
    the recipe's automatic settings came to; `recipe_dir`: where the recipe's relative paths start."""
    hub_base = base_model if not base_model.startswith("tiny:") and not Path(base_model).exists() else None
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": ["vlm-rl", "grpo", "trl"]}
    if hub_base:
        front["base_model"] = hub_base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"`{base_model}` post-trained with GRPO by vlm-rl "
        f"(vlm-rl {versions['vlm-rl']}, TRL {versions['trl']}, transformers {versions['transformers']}, "
        f"torch {versions['torch']}).",
        "",
    ]
    if lora_adapter:
        lines += [
            "This directory holds a **LoRA adapter** (`adapter_config.json`, `adapter_model.safetensors`) for the "
            "base model above, not a full model. To get a full model directory, merge it into the base model:",
            "",
            "```bash",
            f"vlm-rl export --checkpoint path/to/{name} --output_dir path/to/{name}-merged",
            "```",
            "",
        ]
    lines += [
        "## Results",
        "",
    ]
    if eval_results:
        lines += ["Held-out evaluation (greedy):", "", "| metric | value |", "| --- | --- |"]
        for key in ("accuracy", "image_accuracy", "blind_accuracy", "image_reliance", "text_only_accuracy", "chance"):
            if eval_results.get(key) is not None:
                lines.append(f"| {key} | {_number(eval_results[key])} |")
        for reward, value in (eval_results.get("rewards") or {}).items():
            lines.append(f"| reward `{reward}` | {_number(value)} |")
        lines += [
            f"| rows (with images) | {eval_results.get('num_rows')} ({eval_results.get('num_image_rows')}) |",
            "",
            f"`accuracy` is the mean of the `{eval_results.get('accuracy_reward')}` reward; `blind_accuracy` is the "
            "same over rows with images, each shown another row's images; `image_reliance` is their difference.",
            "",
        ]
    else:
        lines += ["No held-out evaluation was run.", ""]
    logged = [(key, _last_logged(log_history, key)) for key in TRAINING_KEYS]
    if any(found for _, found in logged):
        lines += ["Last logged training values:", "", "| metric | step | value |", "| --- | --- | --- |"]
        lines += [f"| {key} | {found[0]} | {_number(found[1])} |" for key, found in logged if found]
        lines.append("")
    if has_plot:
        lines += ["![Training curves](training_curves.png)", ""]
    lines += ["## Rewards", "", "| reward | weight | tasks | keyword arguments |", "| --- | --- | --- | --- |"]
    for row in reward_rows:
        tasks = ", ".join(row["tasks"]) if row["tasks"] else "all rows"
        kwargs = json.dumps(redacted_mapping(row["kwargs"])) if row["kwargs"] else "–"
        lines.append(f"| `{row['name']}` | {_number(row['weight'])} | {tasks} | {kwargs} |")
    lines += ["", "## Data", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {_number(value)} |" for key, value in data.items() if value is not None]
    if resolved:
        lines += ["", "## Settings resolved at run time", "", "| setting | resolved to |", "| --- | --- |"]
        lines += [f"| `{key}` | {value} |" for key, value in resolved.items()]
    where = f" Relative paths in it start from the recipe's directory, `{recipe_dir}`." if recipe_dir else ""
    lines += [
        "",
        "## Recipe",
        "",
        "Local paths above are absolute, as the run resolved them. The fields the run was given (recipe file and "
        f"command line), as it ran with them, paths as written.{where}",
        "",
        "```yaml",
        yaml.safe_dump(_plain(redacted(recipe)), sort_keys=False).strip() if recipe else "# (not recorded)",
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from vlm_rl.models import load_model_and_processor",
        "",
        "# transformers' AutoProcessor works too where torchvision is installed (some processors load a video one).",
        f'model, processor = load_model_and_processor("path/to/{name}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path, **card: Any) -> Path:
    """Write `<output_dir>/README.md` (see `render_model_card` for the keyword arguments)."""
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(name=Path(output_dir).name, **card))
    return path
