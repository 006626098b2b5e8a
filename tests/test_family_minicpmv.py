"""MiniCPM-V has no vlm-rl adapter; these tests pin the reasons given in docs/models.md, so a change that lifts
one of them shows up here.

transformers 5.19 ships MiniCPM-V 4.6 and 4.7 natively (`minicpmv4_6`, `minicpmv4_7`; the models load with
`AutoModelForImageTextToText` offline), but their processors cannot be built without torchvision, and the
image inputs of a whole processor call are packed into one `pixel_values` row whose split into images the
processor's output no longer holds.
"""

import pytest
import transformers
from PIL import Image
from transformers.utils import is_torchvision_available

from vlm_rl.models.processing import image_only_processor_class
from vlm_rl.models.tiny import build_tokenizer


@pytest.mark.skipif(is_torchvision_available(), reason="the video processor loads with torchvision")
@pytest.mark.parametrize("name", ["MiniCPMV4_6Processor", "MiniCPMV4_7Processor"])
def test_processor_needs_the_torchvision_video_processor(name):
    # Stock: the `video_processor` type check fails on the torchvision-less placeholder mapping. Without the video
    # processor: MiniCPM's `__init__` passes its sub-processors positionally (image, video, tokenizer) and then
    # reads `self.video_processor.slice_mode`.
    processor_class = getattr(transformers, name)
    image_processor = transformers.MiniCPMV4_6ImageProcessorPil()
    tokenizer = build_tokenizer(["<|endoftext|>", "<|im_end|>"], "", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for candidate in (processor_class, image_only_processor_class(processor_class)):
        with pytest.raises((AttributeError, TypeError)):
            candidate(image_processor=image_processor, tokenizer=tokenizer)


def test_images_of_a_call_are_packed_into_one_row_without_their_slice_counts():
    image_processor = transformers.MiniCPMV4_6ImageProcessorPil(scale_resolution=56, max_slice_nums=2)
    output = image_processor(images=[Image.new("RGB", (80, 60)), Image.new("RGB", (56, 56))], return_tensors="pt")
    # One packed row for both images; one `target_sizes` row per slice: 3 for the first image, 1 for the second.
    assert output["pixel_values"].shape[0] == 1 and output["target_sizes"].shape[0] == 4
    assert output["num_patches_per_image"] == [3, 1]
    # The processor drops that per-image slice count, so no adapter can tell which slices belong to which row.
    assert "num_patches_per_image" in transformers.MiniCPMV4_6Processor.unused_input_names.fget(None)
