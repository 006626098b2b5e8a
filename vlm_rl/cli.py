"""The `vlm-rl` command."""

from __future__ import annotations

import argparse
import sys


def _tiny_model(args: argparse.Namespace) -> None:
    from vlm_rl.models import build_tiny_model

    path = build_tiny_model(
        args.family,
        args.output_dir,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        seed=args.seed,
    )
    print(f"Tiny {args.family} model written to {path}")


def _plot(args: argparse.Namespace) -> None:
    from vlm_rl.plotting import plot_run

    print(f"Wrote {plot_run(args.run_dir)}")


def _export(args: argparse.Namespace) -> None:
    from vlm_rl.export import export_merged

    path = export_merged(
        args.checkpoint,
        args.output_dir,
        base_model=args.base_model,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"Merged model written to {path}")


def build_parser() -> argparse.ArgumentParser:
    from vlm_rl.models import tiny_families

    parser = argparse.ArgumentParser(prog="vlm-rl", description="GRPO post-training for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "train",
        add_help=False,
        help="Train from a recipe: vlm-rl train --config recipes/X.yaml [--field value ...]; --help lists the fields.",
    )
    commands.add_parser(
        "vllm-serve",
        add_help=False,
        help="Serve rollouts for `vllm_mode: server` with vLLM, set up from the same recipe: "
        "vlm-rl vllm-serve --config recipes/X.yaml [--field value ...] [-- --vllm-flag ...].",
    )
    tiny = commands.add_parser("tiny-model", help="Build a tiny random-weight VLM of a real architecture, offline.")
    tiny.add_argument("--family", required=True, choices=sorted(tiny_families()))
    tiny.add_argument("--output_dir", required=True, help="Directory to save the model and processor to.")
    tiny.add_argument("--hidden_size", type=int, default=64)
    tiny.add_argument("--num_hidden_layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny_model)
    plot = commands.add_parser(
        "plot",
        help="Write RUN_DIR/training_curves.png (reward, accuracy, length, KL, entropy, step time against step) from "
        "RUN_DIR/trainer_state.json, or from the newest checkpoint's while the run is still going.",
    )
    plot.add_argument("run_dir", help="A run's output_dir.")
    plot.set_defaults(func=_plot)
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
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from vlm_rl.train import main as train_main

        train_main(argv[1:])
        return
    if argv and argv[0] == "vllm-serve":
        from vlm_rl.rollout.serve import main as serve_main

        serve_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
