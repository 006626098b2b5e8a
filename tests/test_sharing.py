"""The shared-prompt forward and once-per-image encoding give the plain forward's log-probs and gradients.

Each batch repeats every prompt with different completions of different lengths, in shuffled order, as a GRPO batch
does. The plain path (both switches off) is the reference; each switch alone and both together must match it, and
must actually run fewer tokens through the language model / vision tower where the family supports them.
"""

import functools
import random
from dataclasses import replace

import pytest
import torch
from conftest import ALL_FAMILIES, shapes_trainer, small_config

from vlm_rl.data import make_shapes_dataset
from vlm_rl.data.synthetic import draw_shape
from vlm_rl.models import tiny_families
from vlm_rl.models.inputs import group_rows
from vlm_rl.trainers import VLMGRPOTrainer
from vlm_rl.trainers.shared_prefix import pack

COPIES = 3
SHARED_FAMILIES = [name for name in ALL_FAMILIES if tiny_families()[name].shares_prompts]
ENCODED_FAMILIES = [name for name in ALL_FAMILIES if tiny_families()[name].image_feature_fields]
TEXT_MIX = [name for name in ALL_FAMILIES if tiny_families()[name].text_only]
MODES = {"shared prompt": (True, False), "images once": (False, True), "both": (True, True)}


def prompts(adapter, kind: str) -> list[dict]:
    """Distinct prompts of one kind of batch: `image`, `text`, `mixed` or `multi` (two images in some rows)."""
    images = make_shapes_dataset(2, text_fraction=0.0, seed=3)
    texts = make_shapes_dataset(2, text_fraction=1.0, seed=4)
    rng = random.Random(0)
    two = {
        "prompt": [{"role": "user", "content": "Are the two shapes the same color?"}],
        "images": [draw_shape("circle", "red", 56, rng), draw_shape("square", "blue", 84, rng)],
        "answer": "no",
    }
    # The same image under another question: its prompt differs, its image is shared.
    same_image = {**images[0], "prompt": [{"role": "user", "content": "Which color? One word."}]}
    return {
        "image": [images[0], images[1], same_image],
        "text": [texts[0], texts[1]],
        "mixed": [images[0], texts[0], images[1]],
        "multi": [two, images[0]],
    }[kind]


def kinds(family: str) -> list[str]:
    adapter = tiny_families()[family]
    return ["image"] + ["text", "mixed"] * adapter.text_only + ["multi"] * adapter.multi_image


def distinct_images(adapter, kind: str) -> tuple[int, int]:
    """Distinct images and image slots over one copy of each prompt. With each distinct image encoded once, the
    vision tower does `distinct / slots` of the work of one copy of each prompt (when repeated images share a size)."""
    images = [image for row in prompts(adapter, kind) for image in row["images"]]
    distinct = {(image.size, image.mode, image.tobytes()) for image in images}
    assert len(distinct) == len(images) or len({image.size for image in images}) == 1, "repeated images of other sizes"
    return len(distinct), len(images)


def scoring_batch(trainer, kind: str | list[dict]):
    """Trainer inputs for a batch with every prompt (of a `kind`, or the rows given) `COPIES` times, rows shuffled.
    The copies of a prompt get completions of different lengths (1 to 6 tokens), so that they differ and some are
    padded."""
    distinct = prompts(trainer.adapter, kind) if isinstance(kind, str) else kind
    order = [i for i in range(len(distinct)) for _ in range(COPIES)]
    random.Random(1).shuffle(order)
    rows = [distinct[i] for i in order]
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    width = batch["completion_ids"].size(1)
    assert width >= COPIES, f"generation stopped after {width} tokens: too short for {COPIES} different lengths"
    rng = random.Random(2)
    per_prompt = [rng.sample(range(1, width + 1), COPIES) for _ in distinct]
    lengths = torch.tensor([per_prompt[i].pop() for i in order])
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    adapter = trainer.adapter
    keys = (*adapter.image_keys, *adapter.video_keys, *adapter.row_keys, "num_images", "num_tiles", "num_videos")
    inputs = {key: batch[key] for key in keys if batch.get(key) is not None}
    return input_ids, attention_mask, completion_mask, inputs


def assert_grads_close(grads: dict, reference: dict, where: str) -> None:
    """Each parameter's gradient within 1e-4 of the reference's norm; the floor covers weights whose exact gradient
    is zero (attention key biases: a softmax does not change when every score moves by the same amount)."""
    assert grads.keys() == reference.keys(), where
    for name, grad in grads.items():
        error, size = (grad - reference[name]).norm().item(), reference[name].norm().item()
        assert error <= 1e-4 * size + 1e-7, f"{name}: |difference| {error:.3g} for |gradient| {size:.3g} ({where})"


def vision_module(model, adapter):
    return model.get_submodule(adapter.vision_modules[0])


def score(trainer, model, batch, modes: tuple[bool, bool], chunk: int | None):
    """Log-probs, entropies and gradients of the masked log-prob sum; tokens into the LM and the vision tower."""
    trainer.options = replace(trainer.options, share_prompt_prefix=modes[0], encode_images_once=modes[1])
    input_ids, attention_mask, completion_mask, inputs = batch
    counts = {"language": 0, "vision": 0}

    def count(name):
        def hook(module, args, kwargs):
            first = kwargs.get("inputs_embeds")
            first = first if first is not None else kwargs.get("input_ids", kwargs.get("pixel_values"))
            first = first if first is not None else args[0]
            counts[name] += first.shape[:2].numel() if name == "language" else first.size(0)

        return hook

    hooks = [
        model.get_decoder().register_forward_pre_hook(count("language"), with_kwargs=True),
        vision_module(model, trainer.adapter).register_forward_pre_hook(count("vision"), with_kwargs=True),
    ]
    model.zero_grad()
    try:
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_mask.size(1), chunk, compute_entropy=True, **inputs
        )
        (logps * completion_mask).sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach() * completion_mask, entropies.detach() * completion_mask, grads, counts


def scores_match_the_plain_forward(trainer, model, batch, label: str):
    """Score `batch` under each mode, in one chunk and in chunks of 4 that cut through prompt groups, checking
    log-probs, entropies and gradients against the plain forward's; returns the plain scores and, per mode, where it
    ran, its switches and its one-chunk token counts."""
    plain = score(trainer, model, batch, (False, False), None)
    modes = []
    for mode, switches in MODES.items():
        for chunk in (None, 4):
            logps, entropies, grads, counts = score(trainer, model, batch, switches, chunk)
            where = f"{label}, {mode}, chunk {chunk}"
            torch.testing.assert_close(logps, plain[0], atol=1e-5, rtol=0, msg=f"log-probs: {where}")
            torch.testing.assert_close(entropies, plain[1], atol=1e-5, rtol=0, msg=f"entropies: {where}")
            assert_grads_close(grads, plain[2], where)
            if chunk is None:
                modes.append((where, switches, counts))
    return plain, modes


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        (family, kind) for family in sorted(set(SHARED_FAMILIES + ENCODED_FAMILIES)) for kind in kinds(family)
    ],  # fmt: skip
)
def test_switches_match_the_plain_forward(family, kind, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainer = shapes_trainer(
        model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES, max_completion_length=6
    )
    batch = scoring_batch(trainer, kind)
    plain, modes = scores_match_the_plain_forward(trainer, model, batch, f"{family}, {kind} batch")
    for where, switches, counts in modes:
        shares = switches[0] and family in SHARED_FAMILIES
        encodes = switches[1] and family in ENCODED_FAMILIES
        rows, width = batch[0].shape
        if shares:  # each prompt once: at most one padded row per prompt, then each completion and one token more
            bound = rows // COPIES * width + rows * (batch[2].size(1) + 1)
            assert counts["language"] <= bound < plain[3]["language"], where
        else:
            assert counts["language"] == plain[3]["language"], where
        if kind == "text":
            assert counts["vision"] == plain[3]["vision"] == 0, where
        elif encodes:  # each distinct image once, also one that two different prompts show
            distinct, slots = distinct_images(trainer.adapter, kind)
            assert counts["vision"] * COPIES * slots == plain[3]["vision"] * distinct, where
        elif shares:  # each prompt's images once for its COPIES rows
            assert counts["vision"] * COPIES == plain[3]["vision"], where
        else:
            assert counts["vision"] == plain[3]["vision"], where


@pytest.mark.parametrize("family", [name for name in ALL_FAMILIES if name not in SHARED_FAMILIES + ENCODED_FAMILIES])
def test_families_without_either_fall_back_to_the_plain_forward(family, load_tiny, tmp_path):
    model, processor = load_tiny(family)
    trainer = shapes_trainer(
        model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES, max_completion_length=6
    )
    batch = scoring_batch(trainer, "image")
    plain = score(trainer, model, batch, (False, False), None)
    on = score(trainer, model, batch, (True, True), None)
    assert torch.equal(on[0], plain[0]) and on[3] == plain[3]


def test_gradient_checkpointing_with_both_switches(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    trainer = shapes_trainer(
        model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES, max_completion_length=6
    )
    batch = scoring_batch(trainer, "mixed")
    plain = score(trainer, model, batch, (False, False), None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert model.is_gradient_checkpointing
    logps, _, grads, _ = score(trainer, model, batch, (True, True), None)
    torch.testing.assert_close(logps, plain[0], atol=1e-5, rtol=0)
    assert_grads_close(grads, plain[2], "gradient checkpointing")


def completion_length_reward(completions, **kwargs) -> list[float]:
    """Varies between completions, so that advantages, the loss and the gradients are not zero."""
    return [float(len(str(completion)) % 5) for completion in completions]


def test_training_with_both_switches_logs_the_plain_runs_numbers(load_tiny, tmp_path):
    """End to end: generation, scoring and updates with both switches give the plain run's losses and gradients."""
    histories = {}
    for switches in (False, True):
        model, processor = load_tiny("qwen2_vl")
        args = small_config(
            tmp_path / str(switches),
            num_generations=4,
            per_device_train_batch_size=8,  # 2 prompts x 4 completions, one micro-batch per generation batch
            max_completion_length=6,
            max_steps=3,
            share_prompt_prefix=switches,
            encode_images_once=switches,
        )
        dataset = make_shapes_dataset(8, text_fraction=0.25, seed=5)
        trainer = VLMGRPOTrainer(
            model=model,
            reward_funcs=[completion_length_reward],
            args=args,
            train_dataset=dataset,
            processing_class=processor,
        )
        trainer.train()
        histories[switches] = [row for row in trainer.state.log_history if "loss" in row]
    assert len(histories[True]) == len(histories[False]) == 3
    assert all(row["grad_norm"] > 0 for row in histories[False]), "the comparison needs non-zero updates"
    for plain, shared in zip(histories[False], histories[True], strict=True):
        for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length"):
            assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), (plain["step"], key)


def test_eager_attention_takes_the_additive_mask(load_tiny, tmp_path):
    """SDPA gets a boolean block mask, eager attention an additive one: both give the plain forward's numbers."""
    model, processor = load_tiny("qwen2_vl")
    model.set_attn_implementation("eager")
    trainer = shapes_trainer(
        model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES, max_completion_length=6
    )
    batch = scoring_batch(trainer, "mixed")
    plain = score(trainer, model, batch, (False, False), None)
    logps, _, grads, counts = score(trainer, model, batch, (True, True), None)
    assert counts["language"] < plain[3]["language"]
    torch.testing.assert_close(logps, plain[0], atol=1e-5, rtol=0)
    assert_grads_close(grads, plain[2], "eager attention")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_the_packed_forward_processes_no_padding(family, load_tiny, tmp_path):
    """Prompts of different lengths and completions of different lengths: each prompt's group is scored in a forward
    of its own length, so the language model runs exactly each prompt once (but its last token) and each completion
    with one token more; the log-probs and gradients stay the plain forward's."""
    model, processor = load_tiny(family)
    trainer = shapes_trainer(
        model, processor, tmp_path, num_generations=COPIES, per_device_train_batch_size=COPIES, max_completion_length=6
    )
    batch = scoring_batch(trainer, "mixed" if family in TEXT_MIX else "image")
    input_ids, attention_mask, completion_mask, inputs = batch
    split = trainer.adapter.split_vision_inputs(inputs, inputs["num_images"])
    images = [split[key] for key in trainer.adapter.image_keys if isinstance(split.get(key), list)]
    groups = group_rows(input_ids[:, : -completion_mask.size(1)], images)
    prompt_lengths = attention_mask[:, : -completion_mask.size(1)].sum(dim=1)
    completion_lengths = completion_mask.sum(dim=1)
    # Each prompt's packed length: the prompt but its last token, then each completion with one token more.
    packed = [int(prompt_lengths[group[0]]) - 1 + sum(int(completion_lengths[row]) + 1 for row in group)
              for group in groups]  # fmt: skip
    assert len(groups) == 3 and len(set(packed)) > 1, "one forward for all prompts would pad the shorter ones"
    plain = score(trainer, model, batch, (False, False), None)
    logps, _, grads, counts = score(trainer, model, batch, (True, True), None)
    assert counts["language"] == sum(packed)
    torch.testing.assert_close(logps, plain[0], atol=1e-5, rtol=0)
    assert_grads_close(grads, plain[2], "one forward per prompt")


@pytest.mark.parametrize(
    ("copies", "completion", "packed_is_cheaper"),
    [(8, 32, True), (8, 1024, True), (16, 4096, False)],  # short answers; reasoning; many very long completions
)
def test_packing_is_used_only_where_it_costs_less(copies, completion, packed_is_cheaper):
    prompt = 1000
    input_ids = torch.ones(copies, prompt + completion, dtype=torch.long)
    packing = pack([list(range(copies))], input_ids, torch.ones_like(input_ids), completion)
    # Qwen2.5-VL-3B's language model: hidden 2048, MLP 11008.
    assert packing.cheaper_than_plain(copies, prompt + completion, 2048, 11008) is packed_is_cheaper


def test_images_encoded_once_run_under_the_trainers_autocast(load_tiny, tmp_path):
    """fp32 weights, bf16 mixed precision: the vision tower runs in bf16 on both paths, as in the model forward."""
    model, processor = load_tiny("qwen2_vl")
    trainer = shapes_trainer(
        model, processor, tmp_path, bf16=True, num_generations=COPIES, per_device_train_batch_size=COPIES
    )
    batch = scoring_batch(trainer, "image")
    dtypes = []
    hook = (
        vision_module(model, trainer.adapter)
        .blocks[0]
        .mlp.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    )
    try:
        plain = score(trainer, model, batch, (False, False), None)
        encoded = score(trainer, model, batch, (False, True), None)
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    torch.testing.assert_close(encoded[0], plain[0], atol=1e-5, rtol=0)


def test_distinct_prompts_of_uneven_length_are_scored_without_padding(load_tiny, tmp_path):
    """No prompt repeats: each row is scored in a forward of its own length, with the plain forward's numbers."""
    model, processor = load_tiny("qwen2_vl")
    trainer = shapes_trainer(model, processor, tmp_path, max_completion_length=6)
    rows = prompts(trainer.adapter, "multi")  # two images, then one: two different prompts, as one "group" of G = 2
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    width = batch["completion_ids"].size(1)
    lengths = torch.tensor([width, 1])
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    keys = (*trainer.adapter.image_keys, *trainer.adapter.row_keys, "num_images")
    inputs = {key: batch[key] for key in keys if batch.get(key) is not None}
    scored = (input_ids, attention_mask, completion_mask, inputs)
    plain = score(trainer, model, scored, (False, False), None)
    logps, _, grads, counts = score(trainer, model, scored, (True, True), None)
    assert counts["language"] == int(attention_mask.sum()) < input_ids.numel() == plain[3]["language"]
    torch.testing.assert_close(logps, plain[0], atol=1e-5, rtol=0)
    assert_grads_close(grads, plain[2], "one forward per row")


VIDEO_FAMILIES = sorted(name for name in SHARED_FAMILIES if tiny_families()[name].shares_video_prompts)


def video_prompts() -> list[dict]:
    """A video prompt; the same question about another clip of the same size (the same prompt ids: only the video
    tells the two prompts apart); the first clip again beside an image under another question (a video that two
    prompts show); an image prompt; a text-only prompt. The clip runs at twice the test rate, so that its timing
    (Qwen2.5-VL's `second_per_grid_ts`) is not the default one second per temporal patch."""
    from test_video import RATE, clip

    first = clip(rate=2 * RATE)
    other = type(first)(first[::-1].copy(), first.metadata)
    image = draw_shape("circle", "red", 56, random.Random(0))
    rows = [
        ("Which way does the bar grow?", [], [first]),
        ("Which way does the bar grow?", [], [other]),
        ("Same color as the bar?", [image], [first]),
        ("Color?", [image], []),
        ("Say red.", [], []),
    ]
    return [{"prompt": [{"role": "user", "content": text}], "images": images, "videos": videos, "answer": "red"}
            for text, images, videos in rows]  # fmt: skip


def distinct_patches(pixels: torch.Tensor, grid: torch.Tensor) -> int:
    """The patches of the distinct items (images or videos) of `pixels`, each `grid` row one item's (t, h, w)."""
    items = torch.split(pixels, grid.prod(dim=-1).tolist())
    return sum({item.numpy().tobytes(): item.size(0) for item in items}.values())


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_groups_match_the_plain_forward_with_each_prompt_and_each_video_once(family, load_tiny, tmp_path):
    """A micro-batch of video, image-plus-video, image and text-only groups: with each switch and both, the plain
    forward's log-probs and gradients (M-RoPE of the videos, with Qwen2.5-VL's timing, gathered into the packing),
    each group's prompt and video once through the language model and the vision tower, each distinct video once."""
    from test_video import video_trainer

    model, processor = load_tiny(family)
    rows = video_prompts()
    trainer = video_trainer(model, processor, tmp_path, rows, num_generations=COPIES,
                            per_device_train_batch_size=COPIES, max_completion_length=6)  # fmt: skip
    batch = scoring_batch(trainer, rows)
    inputs = batch[3]
    assert sum(inputs["num_videos"]) == 3 * COPIES
    if family == "qwen2_5_vl":
        assert inputs["second_per_grid_ts"].tolist() == [0.5] * 3 * COPIES
    plain, modes = scores_match_the_plain_forward(trainer, model, batch, f"{family}, video batch")
    for where, switches, counts in modes:
        if switches[0]:  # each prompt once: the language model runs fewer tokens
            assert counts["language"] < plain[3]["language"], where
        if switches[1]:  # each distinct image and video once, also the video two prompts show
            distinct = distinct_patches(inputs["pixel_values"], inputs["image_grid_thw"])
            distinct += distinct_patches(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            assert counts["vision"] == distinct, where
        else:  # each group's images and video once for its COPIES rows
            assert counts["vision"] * COPIES == plain[3]["vision"], where


def count_video_patches(model, seen: list[int]) -> None:
    """Have the model's video encoder note the patches of each call in `seen`: in generation (which picks its inputs
    by the encoder's signature) and in scoring, inside the forward or encoded once."""
    encode = model.model.get_video_features

    @functools.wraps(encode)
    def counted(pixel_values_videos, *args, **kwargs):
        seen.append(pixel_values_videos.size(0))
        return encode(pixel_values_videos, *args, **kwargs)

    model.model.get_video_features = counted


def test_training_on_video_rows_with_both_switches_logs_the_plain_runs_numbers(load_tiny, tmp_path):
    """End to end on video files, images and text, an optimizer step of two micro-batches (prompts kept whole by the
    shuffle): with both switches, the plain run's rewards, loss and gradient norm, with fewer video patches through
    the vision tower. One step: the shuffles draw from the RNG differently, so later generations sample other
    completions."""
    from test_video import file_rows, load, video_trainer, write_jsonl

    rows = file_rows(tmp_path)
    histories, video_patches = {}, {False: [], True: []}
    for switches in (False, True):
        task = load(write_jsonl(tmp_path / "d.jsonl", rows))
        model, processor = load_tiny("qwen2_5_vl")
        count_video_patches(model, video_patches[switches])
        settings = {"video_num_frames": 4, "per_device_train_batch_size": 4, "steps_per_generation": 2,
                    "gradient_accumulation_steps": 2, "max_steps": 1, "share_prompt_prefix": switches,
                    "encode_images_once": switches}  # fmt: skip
        trainer = video_trainer(model, processor, tmp_path / str(switches), [], dataset=task.train,
                                reward=completion_length_reward, **settings)  # fmt: skip
        task.attach_processor(processor)
        trainer.train()
        histories[switches] = [row for row in trainer.state.log_history if "loss" in row]
    (plain,), (shared,) = histories[False], histories[True]
    assert plain["grad_norm"] > 0, "the comparison needs a non-zero update"
    assert 0 < sum(video_patches[True]) < sum(video_patches[False])
    for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length"):
        assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
