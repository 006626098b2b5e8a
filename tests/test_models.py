"""Family adapters: the registry, parameter groups, image-size bounds, and what each family declares."""

import sys

import pytest
import torch
from conftest import ALL_FAMILIES
from PIL import Image
from transformers import AutoModelForImageTextToText
from trl.data_utils import prepare_multimodal_messages

from vlm_rl.config import ModelArguments
from vlm_rl.data import make_shapes_dataset
from vlm_rl.models import (
    adapter_for,
    build_tiny_model,
    families,
    load_model_and_processor,
    register_adapter,
    tiny_families,
)
from vlm_rl.models.adapters import GenericAdapter
from vlm_rl.models.families.qwen_vl import Qwen2VLAdapter, Qwen3VLAdapter
from vlm_rl.models.inputs import prompt_inputs
from vlm_rl.models.loading import build_tiny, resolve_model_path
from vlm_rl.models.tiny import TinySpec, save_tiny_model
from vlm_rl.rewards.boxes import BOX_FORMATS


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_parameter_belongs_to_one_part(family, load_tiny):
    model, _ = load_tiny(family)
    adapter = adapter_for(model.config)
    assert adapter.name == family or model.config.model_type in adapter.model_types
    groups = {name: adapter.parameter_group(name) for name, _ in model.named_parameters()}
    assert None not in groups.values(), [name for name, group in groups.items() if group is None]
    assert {"vision", "projector", "language"} <= set(groups.values())


def test_unknown_model_type_falls_back_to_trl_handling_with_a_warning(caplog):
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config.model_type = "no_such_vlm"
    assert isinstance(adapter_for(config), GenericAdapter)
    assert "No vlm-rl adapter for model type 'no_such_vlm'" in caplog.text


def test_unknown_model_type_warns_once_per_model_type(caplog):
    """The trainer, the freezing options, LoRA and the rollouts each ask for the adapter: one warning is enough."""
    from transformers import PretrainedConfig

    configs = [PretrainedConfig() for _ in range(4)]
    for config, model_type in zip(
        configs, ["unknown_vlm_a", "unknown_vlm_a", "unknown_vlm_a", "unknown_vlm_b"], strict=True
    ):
        config.model_type = model_type
    with caplog.at_level("WARNING", logger="vlm_rl"):
        adapters = [adapter_for(config) for config in configs]
    assert all(isinstance(adapter, GenericAdapter) for adapter in adapters)
    warnings = [record.getMessage() for record in caplog.records if "No vlm-rl adapter" in record.getMessage()]
    assert len(warnings) == 2, warnings
    assert "'unknown_vlm_a'" in warnings[0] and "'unknown_vlm_b'" in warnings[1]


def test_the_registry_maps_each_model_type_to_its_family_class():
    assert families.ADAPTERS["qwen3_vl_moe"] is Qwen3VLAdapter
    assert {name: type(adapter) for name, adapter in tiny_families().items()}["qwen2_vl"] is Qwen2VLAdapter
    for model_type, adapter in families.ADAPTERS.items():
        assert model_type in adapter.model_types and adapter.box_format in BOX_FORMATS, adapter


def test_a_family_of_your_own_registers_once_for_its_model_types(monkeypatch):
    monkeypatch.setattr(families, "ADAPTERS", dict(families.ADAPTERS))

    class FineTuneAdapter(Qwen2VLAdapter):
        name = "my_qwen"
        label = "My Qwen"
        model_types = ("my_qwen",)

    with pytest.raises(TypeError, match="pass the class itself"):
        register_adapter(FineTuneAdapter())  # an instance's settings would be lost: each lookup makes a fresh one
    assert register_adapter(FineTuneAdapter) is FineTuneAdapter
    assert "my_qwen" in tiny_families()
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config.model_type = "my_qwen"
    assert type(adapter_for(config)) is FineTuneAdapter
    with pytest.raises(ValueError, match="named 'my_qwen' is already registered"):
        register_adapter(FineTuneAdapter)

    class Clash(FineTuneAdapter):
        name = "clash"
        model_types = ("qwen2_vl",)

    with pytest.raises(ValueError, match="Model type 'qwen2_vl' of Clash already has an adapter \\(Qwen2VLAdapter\\)"):
        register_adapter(Clash)


def image_patches(processor, width: int, height: int) -> int:
    output = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
    return int(output["image_grid_thw"].prod())


def test_min_max_pixels_bound_qwen_images_and_are_saved_with_the_processor(tiny_dirs, tmp_path):
    path = str(tiny_dirs["qwen2_vl"])
    _, default = load_model_and_processor(path)
    model, bounded = load_model_and_processor(path, min_pixels=56 * 56, max_pixels=56 * 56)
    patch_area = 14 * 14
    # A large image is scaled down to at most max_pixels, a small one up to at least min_pixels.
    assert image_patches(default, 224, 224) * patch_area > 56 * 56
    assert image_patches(bounded, 224, 224) * patch_area <= 56 * 56
    assert image_patches(bounded, 28, 28) * patch_area >= 56 * 56
    # The bounds live on the processor, so a saved checkpoint (and anything that reloads it) keeps them.
    bounded.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    _, reloaded = load_model_and_processor(str(tmp_path))
    assert image_patches(reloaded, 224, 224) == image_patches(bounded, 224, 224)


def test_min_pixels_above_max_pixels_is_an_error(tiny_dirs):
    with pytest.raises(ValueError, match=r"min_pixels \(12544\) exceeds max_pixels \(3136\)"):
        load_model_and_processor(str(tiny_dirs["qwen2_vl"]), min_pixels=112 * 112, max_pixels=56 * 56)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_split_then_merge_gives_back_the_processor_output(family, load_tiny):
    """Per-sample split and merge are exact inverses on a batch with 0, 1 and 2 images per row."""
    model, processor = load_tiny(family)
    adapter = adapter_for(model.config)
    rows = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (84, 56), "blue")]]
    if adapter.multi_image:
        rows.append([Image.new("RGB", (56, 84), "green"), Image.new("RGB", (56, 56), "white")])
    if adapter.text_only:
        rows.insert(1, [])
    texts = [
        processor.apply_chat_template(
            prepare_multimodal_messages([{"role": "user", "content": "Colour?"}], images=images),
            add_generation_prompt=True,
            tokenize=False,
        )
        for images in rows
    ]
    inputs = dict(processor(text=texts, images=rows, padding=True, return_tensors="pt"))
    num_images = [len(images) for images in rows]
    vision = {k: v for k, v in inputs.items() if k in (*adapter.image_keys, *adapter.row_keys)}
    extra = {}
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None and pixel_values.ndim == 4 and pixel_values.size(0) != sum(num_images):
        # Tile-indexed `pixel_values` (InternVL): the processor drops the tiles per image; TRL recomputes them
        # per sample as `num_tiles`, exactly so.
        patches = processor.image_processor(images=rows, crop_to_patches=True, return_tensors="pt")["num_patches"]
        extra["num_tiles"] = [int(group.sum()) for group in torch.split(patches, num_images)]
    split = adapter.split_vision_inputs({**vision, "num_images": num_images, **extra}, num_images)
    for key in adapter.image_keys:
        if key in vision:
            assert isinstance(split[key], list) and len(split[key]) == len(rows), key
    merged = adapter.merge_vision_inputs(split)
    for key, value in vision.items():
        assert torch.equal(merged[key], value), key


def test_tiny_families_are_the_registered_ones_with_a_builder():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"} <= set(tiny_families())


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_builds_its_tiny_model_through_the_one_template(family, tmp_path, monkeypatch):
    """Each family's `build_tiny` hands a `TinySpec` to `save_tiny_model`, and what that saves loads and generates."""
    specs = []

    def recording(spec, output_dir, *, seed):
        specs.append(spec)
        save_tiny_model(spec, output_dir, seed=seed)

    for name, module in list(sys.modules.items()):
        if name.startswith("vlm_rl.models.families.") and getattr(module, "save_tiny_model", None) is save_tiny_model:
            monkeypatch.setattr(module, "save_tiny_model", recording)
    path = build_tiny_model(family, tmp_path / family)
    assert len(specs) == 1 and isinstance(specs[0], TinySpec)
    model, processor = load_model_and_processor(str(path), dtype="float32")
    assert type(model).__name__ == specs[0].model_class
    row = make_shapes_dataset(1, seed=0)[0]
    inputs = prompt_inputs(adapter_for(model.config), processor, [row["prompt"]], [row["images"]])
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_louder_projector_scales_only_the_projectors_last_layer(tmp_path):
    """`tiny_projector_scale` (docs/learning.md): the same seeded model, its image features `scale` times louder."""
    plain = AutoModelForImageTextToText.from_pretrained(build_tiny("qwen2_vl", tmp_path / "plain"))
    loud_dir = resolve_model_path("tiny:qwen2_vl", tmp_path, projector_scale=10)
    assert loud_dir.endswith("tiny-qwen2_vl-projector10")
    loud = AutoModelForImageTextToText.from_pretrained(loud_dir)
    changed = {
        name
        for (name, a), (_, b) in zip(plain.named_parameters(), loud.named_parameters(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed == {"model.visual.merger.mlp.2.weight"}  # its bias is zero
    torch.testing.assert_close(loud.model.visual.merger.mlp[2].weight, 10 * plain.model.visual.merger.mlp[2].weight)
    with pytest.raises(ValueError, match="tiny_projector_scale must be positive"):
        ModelArguments(tiny_projector_scale=0)
