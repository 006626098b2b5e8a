"""The key/value cache after a shared prefill appends in place, holding what `torch.cat` would."""

import torch
from conftest import shapes_trainer
from test_prefill import generate_inputs
from transformers.cache_utils import DynamicCache, DynamicLayer

from vlm_rl.rollout.in_place_cache import InPlaceLayer, append_in_place
from vlm_rl.rollout.prefill import prompts_prefilled_once


def test_appending_in_place_holds_what_concatenation_holds():
    torch.manual_seed(0)
    plain, in_place = DynamicLayer(), InPlaceLayer()
    # A 5-token prompt for 3 rows, then 12 tokens; 2 rows from the 8th token on.
    steps = [torch.randn(3, 2, 5, 4)] + [torch.randn(3 if step < 7 else 2, 2, 1, 4) for step in range(1, 13)]
    pointers = set()
    for step, states in enumerate(steps):
        expected = plain.update(states, -states)
        got = in_place.update(states, -states)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), step
        pointers.add(in_place.key_buffer.data_ptr())
        if step == 6:  # rows leave (a finished row), then a crop: the views follow, the buffers are rebuilt once
            for layer in (plain, in_place):
                layer.batch_select_indices(torch.tensor([0, 2]))
                layer.crop(-1)
    # 12 appends after the prompt: the buffer doubled twice and was rebuilt once, not replaced every step
    assert len(pointers) <= 4


def test_a_prefilled_generation_appends_in_place(load_tiny, tmp_path):
    model, processor = load_tiny("qwen2_vl")
    trainer = shapes_trainer(model, processor, tmp_path)
    inputs, images = generate_inputs(trainer, processor)
    caches = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(kwargs.get("past_key_values")), with_kwargs=True
    )
    try:
        with prompts_prefilled_once(model, model, trainer.adapter, [len(row) for row in images]):
            model.generate(**inputs, do_sample=False, max_new_tokens=3)
    finally:
        hook.remove()
    decoding = caches[1:]  # after the prefill of the distinct prompts
    assert decoding and all(isinstance(cache, DynamicCache) for cache in decoding)
    assert all(type(layer) is InPlaceLayer for cache in decoding for layer in cache.layers)


def test_only_full_attention_layers_of_a_dynamic_cache_change():
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicLayer()]
    append_in_place(cache)
    assert [type(layer) for layer in cache.layers] == [InPlaceLayer, InPlaceLayer]
