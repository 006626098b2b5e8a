"""`vlm-rl eval`: a saved model on a recipe's held-out data, with the recipe's rewards, written to disk."""

import json

import pytest
import yaml
from PIL import Image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from vlm_rl.cli import main as cli_main
from vlm_rl.data import make_shapes_dataset
from vlm_rl.models import build_tiny_model

RECIPE = {
    "model_name_or_path": "unused: vlm-rl eval takes --model",
    "dtype": "float32",
    "dataset": "synthetic:shapes",
    "train_size": 8,
    "eval_size": 8,
    "text_fraction": 0.25,
    "reward_funcs": ["accuracy", "think_answer_format"],
    "max_completion_length": 3,
    "per_device_eval_batch_size": 3,  # batches that do not divide the rows
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("model"))


def write_recipe(directory, **fields):
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(directory / "unused"), **fields}))
    return str(path)


def test_eval_writes_samples_and_a_summary_that_agree(tmp_path, saved_model, capsys):
    recipe = write_recipe(tmp_path)
    cli_main(
        ["eval", "--model", str(saved_model), "--config", recipe, "--ablate-images", "--output_dir", str(tmp_path)]
    )
    assert "image_reliance" in capsys.readouterr().out

    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    expected = make_shapes_dataset(8, "test", text_fraction=0.25, seed=42)  # the recipe's held-out rows
    assert [s["index"] for s in samples] == list(range(8))
    assert [s["num_images"] for s in samples] == [len(row["images"] or []) for row in expected]
    assert [s["answer"] for s in samples] == expected["answer"]
    image_rows = {s["index"] for s in samples if s["num_images"]}
    assert 2 <= len(image_rows) < 8
    for sample in samples:
        assert set(sample["rewards"]) == {"accuracy", "think_answer_format"}
        assert isinstance(sample["completion"], str)
        if sample["num_images"]:  # shown another image row's images, never its own
            assert sample["blind_image_from"] in image_rows - {sample["index"]}
        else:
            assert sample["blind_image_from"] is None

    results = json.loads((tmp_path / "eval_results.json").read_text())

    def mean(values):
        return sum(values) / len(values)

    assert results["num_rows"] == 8 and results["num_image_rows"] == len(image_rows)
    assert results["accuracy"] == pytest.approx(mean([s["rewards"]["accuracy"] for s in samples]))
    image_samples = [s for s in samples if s["num_images"]]
    assert results["image_accuracy"] == pytest.approx(mean([s["rewards"]["accuracy"] for s in image_samples]))
    assert results["blind_accuracy"] == pytest.approx(mean([s["blind_rewards"]["accuracy"] for s in image_samples]))
    assert results["image_reliance"] == pytest.approx(results["image_accuracy"] - results["blind_accuracy"])
    assert results["chance"] == 0.25 and results["split"] == "eval" and results["model"] == str(saved_model)
    format_mean = mean([s["rewards"]["think_answer_format"] for s in samples])
    assert results["rewards"]["think_answer_format"] == pytest.approx(format_mean)


def test_eval_without_ablation_and_with_recipe_overrides(tmp_path, saved_model):
    recipe = write_recipe(tmp_path)
    cli_main(["eval", "--model", str(saved_model), "--config", recipe, "--limit", "5", "--eval_size", "6"])
    results = json.loads((saved_model / "eval" / "eval_results.json").read_text())  # default: MODEL/eval
    assert results["num_rows"] == 5 and "blind_accuracy" not in results
    assert len((saved_model / "eval" / "eval_samples.jsonl").read_text().splitlines()) == 5


def test_eval_errors_name_what_to_fix(tmp_path, saved_model):
    no_held_out = write_recipe(
        tmp_path, dataset=str(tmp_path / "rows.jsonl"), eval_size=None, train_size=None, text_fraction=0.0
    )
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "Say red.", "answer": "red"}) + "\n")
    with pytest.raises(SystemExit, match="has no held-out data: set eval_dataset, eval_split or eval_size"):
        cli_main(["eval", "--model", str(saved_model), "--config", no_held_out])
    with pytest.raises(SystemExit, match="at least two rows with images"):
        text_only = write_recipe(tmp_path, text_fraction=1.0)
        cli_main(["eval", "--model", str(saved_model), "--config", text_only, "--ablate-images"])
    with pytest.raises(SystemExit, match="--ablate-frames needs a row with a video, but none of the 8 evaluated rows"):
        cli_main(["eval", "--model", str(saved_model), "--config", write_recipe(tmp_path), "--ablate-frames"])
    with pytest.raises(SystemExit, match="holds no model"):
        cli_main(["eval", "--model", str(tmp_path), "--config", write_recipe(tmp_path)])
    with pytest.raises(SystemExit):  # an unknown flag of a command without recipe overrides
        cli_main(["plot", str(tmp_path), "--learning_rate", "1"])


def test_eval_ablate_frames_shows_each_video_its_own_frames_out_of_order_and_reports_order_reliance(
    tmp_path, saved_model, monkeypatch
):
    shades = (0, 80, 160, 240)  # each frame one grey level, so the order a clip reaches the processor in shows
    for k, shade in enumerate(shades):
        Image.new("RGB", (56, 56), (shade,) * 3).save(tmp_path / f"frame{k}.png")
    video = [f"frame{k}.png" for k in range(len(shades))]
    rows = [
        {"prompt": "Lighter or darker?", "videos": video, "answer": "lighter"},
        {"prompt": "Say red.", "answer": "red"},
        {"prompt": "Which way?", "videos": video, "answer": "lighter"},
        {"prompt": "And now?", "videos": video, "answer": "lighter"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path, dataset=str(tmp_path / "rows.jsonl"), eval_size=None, train_size=None,
                          text_fraction=0.0, video_max_pixels=56 * 56, per_device_eval_batch_size=4)  # fmt: skip
    seen = []  # per processor call: each clip's frames, as their grey levels

    def recording(self, videos, **kwargs):
        seen.append([[round(float(frame.mean())) for frame in clip] for clip in videos])
        return preprocess(self, videos, **kwargs)

    preprocess = Qwen2VLVideoProcessor.preprocess
    monkeypatch.setattr(Qwen2VLVideoProcessor, "preprocess", recording)
    cli_main(["eval", "--model", str(saved_model), "--config", recipe, "--split", "train", "--ablate-frames",
              "--output_dir", str(tmp_path / "eval")])  # fmt: skip

    *loading, in_order, shuffled = seen  # rows measured as they load; the batch; the batch with frames shuffled
    assert in_order == [list(shades)] * 3 and all(call == [list(shades)] for call in loading)
    samples = [json.loads(line) for line in (tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()]
    orders = [sample["shuffled_frame_order"] for sample in samples]
    assert orders[1] is None and [sample["num_videos"] for sample in samples] == [1, 0, 1, 1]
    for clip, order in zip(shuffled, [orders[0], orders[2], orders[3]], strict=True):
        assert clip == [shades[k] for k in order]  # what the sample reports is what the model saw
        assert all(shades[position] != shade for position, shade in enumerate(clip))  # no frame in its own place
    assert len({tuple(order) for order in orders if order}) > 1  # rows are shuffled apart, seeded per row

    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    video_samples = [samples[k] for k in (0, 2, 3)]
    assert results["num_video_rows"] == 3 and "blind_accuracy" not in results
    shuffled_accuracy = sum(s["shuffled_rewards"]["accuracy"] for s in video_samples) / 3
    assert results["frames_shuffled_accuracy"] == pytest.approx(shuffled_accuracy)
    assert results["order_reliance"] == pytest.approx(results["video_accuracy"] - shuffled_accuracy)
    assert set(results["frames_shuffled_rewards"]) == {"accuracy", "think_answer_format"}
