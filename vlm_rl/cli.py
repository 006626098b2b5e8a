"""The `vlm-rl` command.

Parsing imports nothing heavy, so `vlm-rl --help` and `vlm-rl recipes` answer at once; each command imports
what it needs when it runs. `train` and `vllm-serve` take a recipe's fields as flags, parsed by the recipe
parser itself (`vlm_rl.config.parse_recipe`); `train` answers `--help` and rejects a recipe file's unknown keys and
mistyped values before importing it (TRL takes seconds to import).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_rl.errors import UsageError
from vlm_rl.recipe_check import FIELD_TABLE, SFT_FIELD_TABLE, RecipeError, check_recipe, recipe_path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # in a source checkout


# `vlm_rl.models.tiny_families()`, spelled out so that parsing imports no model code (a test keeps them equal).
TINY_FAMILIES = (
    "blip2",
    "gemma3",
    "idefics3",
    "instructblip",
    "internvl",
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "smolvlm",
)


def _tiny_model(args: argparse.Namespace, overrides: list[str]) -> None:
    from vlm_rl.models.loading import build_tiny  # lazy: start-up speed

    path = build_tiny(
        args.family,
        args.output_dir,
        projector_scale=args.projector_scale,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        seed=args.seed,
    )
    print(f"Tiny {args.family} model written to {path}")


def _plot(args: argparse.Namespace, overrides: list[str]) -> None:
    from vlm_rl.plotting import plot_run  # lazy: start-up speed

    print(f"Wrote {plot_run(args.run_dir)}")


def _export(args: argparse.Namespace, overrides: list[str]) -> None:
    from vlm_rl.export import export_merged  # lazy: start-up speed

    path = export_merged(
        args.checkpoint,
        args.output_dir,
        base_model=args.base_model,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"Merged model written to {path}")


def _eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from vlm_rl.evaluation import evaluate_saved_model  # lazy: start-up speed

    evaluate_saved_model(args, overrides)


def recipe_summaries(directory: Path) -> list[tuple[str, str]]:
    """(file name, first-line summary) of each recipe in `directory`: a recipe's first line is a `# ` comment."""
    summaries = []
    for path in sorted(directory.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        summary = first[0].removeprefix("#").strip() if first and first[0].startswith("#") else "(no summary line)"
        summaries.append((path.name, summary))
    return summaries


def _recipes(args: argparse.Namespace, overrides: list[str]) -> None:
    directory = Path(args.dir) if args.dir else next((d for d in (Path("recipes"), RECIPES_DIR) if d.is_dir()), None)
    if directory is None or not directory.is_dir():
        raise SystemExit(
            f"No recipes directory ({args.dir or 'recipes/ here, or in the vlm-rl source checkout'}): "
            "pass --dir, or run from a vlm-rl checkout."
        )
    summaries = recipe_summaries(directory)
    if not summaries:
        raise SystemExit(f"{directory} holds no *.yaml recipe.")
    width = max(len(name) for name, _ in summaries)
    print(f"Recipes in {directory} (run one with: vlm-rl train --config {directory}/NAME; *_sft* ones: vlm-rl sft):")
    for name, summary in summaries:
        print(f"  {name:<{width}}  {summary}")


TRAIN_USAGE = """\
usage: vlm-rl train --config RECIPE.yaml [--field value ...]

Train with GRPO from a recipe (list the shipped ones with `vlm-rl recipes`). Any recipe field can also be given as
a flag, which wins over the recipe file.

main options:
  --config RECIPE.yaml          the recipe: model, data, rewards and training settings in one YAML file
  --output_dir DIR              where checkpoints, logs (metrics.jsonl) and the final model go
  --max_steps N                 optimizer steps to train for
  --resume_from_checkpoint DIR  go on from a checkpoint; `auto`: the newest complete one in output_dir
  --help-all                    every field with its type and default (some 230)

The fields, by concern, with examples: docs/recipes.md."""


SFT_USAGE = """\
usage: vlm-rl sft --config RECIPE.yaml [--field value ...]

Supervised fine-tuning (a warm start for `vlm-rl train`) on prompt-completion rows, from a recipe in the same format
(the model, data, LoRA and freezing fields of `vlm-rl train`, and TRL's SFTConfig fields). The loss is on the
completion's tokens; the output directory is a model_name_or_path for `vlm-rl train`.

main options:
  --config RECIPE.yaml          the recipe: model, data and training settings in one YAML file
  --output_dir DIR              where checkpoints and the final model go
  --max_steps N                 optimizer steps to train for
  --resume_from_checkpoint DIR  go on from a checkpoint; `auto`: the newest complete one in output_dir
  --help-all                    every field with its type and default

The data format and what carries over from `vlm-rl train`: docs/sft.md."""
# The usage and the stored field table (`recipe_check`) of each command that runs a recipe.
RECIPE_COMMANDS = {"train": (TRAIN_USAGE, FIELD_TABLE), "sft": (SFT_USAGE, SFT_FIELD_TABLE)}


def _recipe_preflight(command: str, argv: list[str]) -> None:
    """Answer `--help` and reject a recipe's unknown keys and mistyped values before `train` or `sft` imports TRL,
    which takes many seconds. `--help-all` is left to the recipe parser, which lists every field."""
    if "--help-all" in argv:
        return
    usage, table = RECIPE_COMMANDS[command]
    if "-h" in argv or "--help" in argv:
        print(usage)
        raise SystemExit(0)
    path = recipe_path(argv)
    if path is not None:
        try:
            check_recipe(path, stored=table)
        except RecipeError as error:
            sys.exit(f"vlm-rl {command}: error: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-rl", description="GRPO post-training for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "train",
        add_help=False,
        help="Train from a recipe: vlm-rl train --config recipes/X.yaml [--field value ...]; --help-all lists the "
        "fields.",
    )
    commands.add_parser(
        "sft",
        add_help=False,
        help="Supervised warm start from a recipe (prompt-completion rows): vlm-rl sft --config recipes/X.yaml "
        "[--field value ...]; --help-all lists the fields.",
    )
    evaluate = commands.add_parser(
        "eval",
        help="Evaluate a saved model on a recipe's held-out data with the recipe's rewards.",
        description="Generate greedily with a saved model on a recipe's held-out data, score every completion with "
        "the recipe's rewards, and write OUTPUT_DIR/eval_samples.jsonl (one line per row) and "
        "OUTPUT_DIR/eval_results.json (each reward's mean, accuracy; with --ablate-images the blind accuracy, with "
        "--ablate-frames the accuracy with each video's frames shuffled). Any "
        "other --field value overrides the recipe, e.g. --eval_dataset data/test.jsonl.",
    )
    evaluate.add_argument("--model", required=True, help="A run's output_dir, a checkpoint-N, or a LoRA adapter dir.")
    evaluate.add_argument("--config", required=True, help="The recipe: its data, rewards and eval_accuracy_reward.")
    evaluate.add_argument("--output_dir", help="Where to write the results. Default: MODEL/eval.")
    evaluate.add_argument(
        "--ablate-images",
        "--ablate_images",
        dest="ablate_images",
        action="store_true",
        help="Evaluate again with each row's images swapped for another row's (none keeps its own); report "
        "blind_accuracy and image_reliance = image_accuracy - blind_accuracy: how much the policy uses the image.",
    )
    evaluate.add_argument(
        "--ablate-frames",
        "--ablate_frames",
        dest="ablate_frames",
        action="store_true",
        help="Evaluate again with each video's frames shuffled within its clip (no frame keeps its place); report "
        "frames_shuffled_accuracy and order_reliance = video_accuracy - frames_shuffled_accuracy: how much the "
        "policy uses the order of the frames.",
    )
    evaluate.add_argument(
        "--split", choices=["eval", "train"], default="eval", help="Which split of the recipe's data."
    )
    evaluate.add_argument("--limit", type=int, help="Evaluate only the first N rows.")
    evaluate.add_argument(
        "--batch_size", type=int, help="Rows per generate call. Default: per_device_eval_batch_size."
    )
    evaluate.add_argument("--max_new_tokens", type=int, help="Default: the recipe's max_completion_length.")
    evaluate.set_defaults(func=_eval, takes_overrides=True)

    plot = commands.add_parser(
        "plot",
        help="Write RUN_DIR/training_curves.png: reward, accuracy, length, KL, entropy and step time against step.",
        description="Draw RUN_DIR/training_curves.png from RUN_DIR/trainer_state.json, or from the newest complete "
        "checkpoint's while the run is still going.",
    )
    plot.add_argument("run_dir", help="A run's output_dir.")
    plot.set_defaults(func=_plot)

    tiny = commands.add_parser("tiny-model", help="Build a tiny random-weight VLM of a real architecture, offline.")
    tiny.add_argument(
        "--family",
        required=True,
        choices=TINY_FAMILIES,
        metavar="FAMILY",
        help=f"The model family: {', '.join(TINY_FAMILIES)} (docs/models.md).",
    )
    tiny.add_argument("--output_dir", required=True, help="Directory to save the model and processor to.")
    tiny.add_argument("--hidden_size", type=int, default=64)
    tiny.add_argument("--num_hidden_layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--projector_scale",
        type=float,
        default=1.0,
        help="Multiply the projector's output by this (docs/learning.md).",
    )
    tiny.set_defaults(func=_tiny_model)

    export = commands.add_parser(
        "export", help="Merge a LoRA run's adapter into its base model and save a full model directory."
    )
    export.add_argument(
        "--checkpoint", required=True, help="A LoRA run's output_dir or checkpoint-N directory (adapter_config.json)."
    )
    export.add_argument("--output_dir", required=True, help="Directory to save the merged model and processor to.")
    export.add_argument(
        "--base_model",
        default=None,
        help="Base model directory or Hub id. Default: base_model_name_or_path in the adapter_config.json.",
    )
    export.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    export.add_argument("--trust_remote_code", action="store_true")
    export.set_defaults(func=_export)

    recipes = commands.add_parser("recipes", help="List the shipped recipes, one line each.")
    recipes.add_argument("--dir", help="A directory of recipes. Default: recipes/ here, else the source checkout's.")
    recipes.set_defaults(func=_recipes)

    commands.add_parser(
        "vllm-serve",
        add_help=False,
        help="Serve rollouts for `vllm_mode: server` with vLLM, set up from the same recipe: "
        "vlm-rl vllm-serve --config recipes/X.yaml [--field value ...] [-- --vllm-flag ...].",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command not in ("train", "sft", "eval", "plot", "export", "vllm-serve"):
        _run(argv)
        return
    if command in RECIPE_COMMANDS:
        _recipe_preflight(command, argv[1:])
    # A mistake in what the user gave (recipe, data, flags, paths) is reported as one line, not as a traceback.
    try:
        _run(argv)
    except Exception as error:
        if not isinstance(error, _user_errors(command)):
            raise
        sys.exit(f"vlm-rl {command}: error: {error}")


def _user_errors(command: str) -> tuple[type[Exception], ...]:
    """The error types that are the user's to fix; those of data and rewards only for the commands that read data
    and rewards (their modules take seconds to import)."""
    if command not in ("train", "sft", "eval", "vllm-serve"):
        return (UsageError,)
    from vlm_rl.data import DataError  # lazy: start-up speed
    from vlm_rl.rewards import RewardSpecError

    return UsageError, DataError, RewardSpecError


def _run(argv: list[str]) -> None:
    if argv and argv[0] == "train":
        from vlm_rl.train import main as train_main  # lazy: start-up speed

        train_main(["--help" if arg == "--help-all" else arg for arg in argv[1:]])
        return
    if argv and argv[0] == "sft":
        from vlm_rl.sft import main as sft_main  # lazy: start-up speed

        sft_main(["--help" if arg == "--help-all" else arg for arg in argv[1:]])
        return
    if argv and argv[0] == "vllm-serve":
        from vlm_rl.rollout.serve import main as serve_main  # lazy: start-up speed

        serve_main(argv[1:])
        return
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.func(args, overrides)


if __name__ == "__main__":
    main()
