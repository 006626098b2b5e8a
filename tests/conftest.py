import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlm_rl.config import VLMGRPOConfig  # noqa: E402
from vlm_rl.models import build_tiny_model, load_model_and_processor, tiny_families  # noqa: E402
from vlm_rl.rewards.timeout import time_limit  # noqa: E402

torch.set_num_threads(1)

ALL_FAMILIES = sorted(tiny_families())
# Families whose rows may mix text-only and image rows in one batch / hold several images.
TEXT_MIX_FAMILIES = [name for name in ALL_FAMILIES if tiny_families()[name].text_only]
MULTI_IMAGE_FAMILIES = [name for name in ALL_FAMILIES if tiny_families()[name].multi_image]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny model directory per family, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in ALL_FAMILIES}


@pytest.fixture
def load_tiny(tiny_dirs):
    """Fresh (model, processor) of a family, fp32, as the trainer would load them."""

    def load(family: str):
        return load_model_and_processor(str(tiny_dirs[family]), dtype="float32")

    return load


def small_config(output_dir, **overrides) -> VLMGRPOConfig:
    """A CPU-sized GRPO config: a few tiny steps, no checkpoints unless asked."""
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
        # No flex compile (~10 s a process) in every test that scores without gradients: the block-sparse kernel
        # has its own tests (tests/test_block_mask.py, with `packed_attention: auto`).
        "packed_attention": "dense",
    }
    settings.update(overrides)
    return VLMGRPOConfig(**settings)


def shapes_trainer(model, processor, output_dir, reward_funcs=None, **overrides):
    """A `VLMGRPOTrainer` on 4 synthetic shape rows, rewarded by `accuracy` unless told, with `small_config`."""
    from vlm_rl.data import make_shapes_dataset
    from vlm_rl.rewards.accuracy import accuracy
    from vlm_rl.trainers import VLMGRPOTrainer

    return VLMGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs or [accuracy],
        args=small_config(output_dir, **overrides),
        train_dataset=make_shapes_dataset(4),
        processing_class=processor,
    )


def no_hang(seconds: float = 30.0):
    """Interrupt the block after `seconds`: a guard against pathological (e.g. quadratic) inputs, not a timing.

    Linear work on the inputs tested finishes in well under a second; a quadratic path takes minutes.
    """
    return time_limit(seconds, what="work that must not hang on adversarial input")
