"""On a CPU torch, PyPI's torchvision (a CUDA build, in the default install for the video processors) cannot load its
compiled ops, and importing it fails. `import torch` itself runs vlm-rl's `torch.backends` entry point, which makes
its Python side importable: TRL and transformers load their processors whatever is imported first."""

import os
import subprocess
import sys

import pytest

from vlm_rl import _torchvision

# Both load a multimodal model class, whose import chain imports torchvision; vlm_rl is never imported.
CODE = "from trl import GRPOTrainer\nfrom transformers import Qwen2VLForConditionalGeneration\nimport sys\n"
CODE += "assert 'vlm_rl._torchvision' in sys.modules and 'vlm_rl.trainers' not in sys.modules\nprint('ok')"


def run(**env: str) -> subprocess.CompletedProcess:
    # Without the PYTHONPATH entry `import vlm_rl` adds for subprocesses: the entry point alone must do it.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "_startup" not in p]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **env}
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=environment, timeout=120)


@pytest.mark.skipif(_torchvision._library is None, reason="torchvision loads its own ops here: nothing to declare")
def test_trl_and_transformers_import_before_vlm_rl():
    result = run()
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    # Without torch's autoload of the entry point, the same script fails in torchvision's op registrations.
    assert run(TORCH_DEVICE_BACKEND_AUTOLOAD="0").returncode != 0
