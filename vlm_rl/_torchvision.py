"""Make a torchvision whose compiled ops cannot load importable (the CUDA-only PyPI wheels on a CPU torch).

On PyPI, torchvision is built against CUDA torch; with the CPU torch its `_C` extension fails to load, and importing
torchvision then fails in its fake-tensor registrations for `torchvision::nms` / `qnms`, whose schemas live in that
extension. vLLM's Qwen-VL models import transformers' torchvision image processors, so nothing multimodal runs.
Declaring the two schemas before torchvision is imported lets its pure-Python transforms (all image preprocessing
uses) import; calling the compiled detection ops still fails, as it would anyway.

The install registers `on_torch_import` in torch's `torch.backends` entry-point group, which `import torch` runs (see
torch's `_import_device_backends`; `TORCH_DEVICE_BACKEND_AUTOLOAD=0` turns it off): so a script that imports
transformers or TRL before vlm_rl works too. `import vlm_rl` declares them as well, and subprocesses get the same
through `vlm_rl/_startup/sitecustomize.py` (for environments where the autoload is off).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def declare_missing_ops() -> bool:
    """Declare torchvision's op schemas when torchvision is installed but its extension cannot load.

    Returns True when it declared them. Must run before the first `import torchvision`.
    """
    global _library
    spec = importlib.util.find_spec("torchvision")
    if _library is not None or spec is None or not spec.submodule_search_locations:
        return False
    import torch  # only with torchvision installed: `import vlm_rl` alone (the CLI's parsing) stays light

    if _library is not None:  # the first `import torch` ran `on_torch_import`, which declared them
        return False

    package = Path(next(iter(spec.submodule_search_locations)))
    for extension in package.glob("_C*.so"):
        try:
            torch.ops.load_library(str(extension))
            return False  # a working build: its own schemas are registered
        except OSError:
            break
    _library = torch.library.Library("torchvision", "DEF")  # kept alive: dropping it removes the schemas
    for schema in _SCHEMAS.values():
        _library.define(schema)
    # Subprocesses (vLLM's model inspection, engine and workers) need the same before their own imports.
    startup = str(Path(__file__).parent / "_startup")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if startup not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [startup, *paths] if p)
    return True


def on_torch_import() -> None:
    """`declare_missing_ops`, run by `import torch` itself (the `torch.backends` entry point). It must never make
    `import torch` fail: a failure is logged and leaves torchvision as it was."""
    try:
        declare_missing_ops()
    except Exception as error:  # an entry point that raises aborts `import torch` for the whole environment
        logging.getLogger(__name__).warning("vlm-rl could not make torchvision importable: %s", error)
