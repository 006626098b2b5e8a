"""Checkpoints on disk: written whole or not at all, checked before resuming, and rotated without losing the last
good one.

A checkpoint is written into `output_dir/.incomplete/checkpoint-N` and renamed to `output_dir/checkpoint-N` only
once every process has finished writing, with a manifest of every file's size written last. So a run killed while
saving leaves at most a directory under `.incomplete/`, which nothing resumes from; a checkpoint damaged later
(a truncated copy, a full disk) fails the manifest or the file checks and is skipped by `auto`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlm_rl.errors import RunStopped, first_line

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint_manifest.json"
STAGING_DIR = ".incomplete"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save's zip archives (optimizer, RNG, DeepSpeed shards, args)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _safetensors_problem(path: Path) -> str | None:
    """Whether the file is as long as its header says: a truncated copy is not."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            return f"{path.name} is truncated (header of {header_size} bytes in a file of {size})"
        try:
            header = json.loads(file.read(header_size))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + header_size + end:
        return f"{path.name} is {size} bytes, its header describes {8 + header_size + end}"
    return None


def _file_problem(path: Path) -> str | None:
    """A structural check of one file that reads only its header or index, not its contents."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in _TORCH_SUFFIXES:
        try:
            with zipfile.ZipFile(path):  # reads the central directory at the end of the file
                return None
        except (zipfile.BadZipFile, OSError) as error:
            return f"{path.name} is not a complete archive ({error})"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as error:
            return f"unreadable {path.name} ({error})"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None if it looks complete."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json"
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        return "no model weights"
    manifest_file = path / MANIFEST
    if manifest_file.is_file():  # written last by vlm-rl: every file it lists must be there, whole
        try:
            manifest = json.loads(manifest_file.read_text())["files"]
        except (OSError, ValueError, KeyError) as error:
            return f"unreadable {MANIFEST} ({error})"
        for name, size in manifest.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} is {file.stat().st_size} bytes, {size} were written"
    for file in sorted(path.rglob("*")):
        if file.is_file():
            problem = _file_problem(file)
            if problem is not None:
                return problem
    return None


def saved_weight_names(checkpoint: str | Path) -> set[str] | None:
    """The names of the full-model weights in a checkpoint (read from headers only), or None if it has none."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(single, framework="pt") as file:
        return set(file.keys())


def load_renamed_weights(model, checkpoint: str | Path) -> bool:
    """Load a checkpoint whose weights are saved under the model's original checkpoint names; whether it was one.

    transformers 5 saves many VLMs' weights under those names (`save_pretrained`'s `save_original_format`), and HF's
    resume loads them with a plain `load_state_dict` that matches none of them: it warns and trains on from the base
    weights. `from_pretrained` converts the names (holding a second copy of the weights on the CPU meanwhile).
    """
    saved = saved_weight_names(checkpoint)
    if saved is None or saved <= set(model.state_dict()):
        return False
    parameter = next(model.parameters())
    loaded = type(model).from_pretrained(checkpoint, dtype=parameter.dtype, device_map="cpu")
    model.load_state_dict(loaded.state_dict(), strict=True)
    return True


def write_manifest(path: Path) -> None:
    """Record the size of every file in the checkpoint; the last file written into it."""
    files = {str(file.relative_to(path)): file.stat().st_size for file in sorted(path.rglob("*")) if file.is_file()}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


class CheckpointNotSaved(RunStopped, OSError):
    """A checkpoint could not be written (a full disk, a quota, a read-only or vanished file system): training stops,
    as it would lose more than the steps since the last checkpoint if it went on without one."""


# The write errors that free space, not a fix to the run, cures.
_SPACE_ERRORS = {errno.ENOSPC: "Disk full", errno.EDQUOT: "Disk quota exceeded"}
_FULL_BELOW = 1 << 20  # bytes free on a file system that a checkpoint write just failed on


def not_saved(error: str, output_dir: str | Path, global_step: int) -> CheckpointNotSaved:
    """The one-line error for a checkpoint that failed to write: what failed, where, what `auto` resumes from now,
    and what to do."""
    last = latest_checkpoint(output_dir)
    resumes = f"the last complete checkpoint, {last}, is" if last is not None else "no complete checkpoint is"
    return CheckpointNotSaved(
        f"{error}, writing {PREFIX_CHECKPOINT_DIR}-{global_step} in {output_dir}: training stopped and the partial "
        f"checkpoint was removed; {resumes} what --resume_from_checkpoint auto continues from. Free space there (or "
        "set output_dir to a file system with room), then run the same command with --resume_from_checkpoint auto."
    )


def full_disk(error: BaseException, directory: str | Path) -> int | None:
    """ENOSPC or EDQUOT when `error`, raised writing into `directory`, came from a full file system; else None.

    A full disk reaches Python in several forms: `OSError` (ENOSPC) from plain writes, a `SafetensorError` ("os
    error 28") from the weights, and a `RuntimeError` from `torch.save` that names only a file position. So the
    file system's free space is asked too: less than a megabyte left is a full disk, whatever the error says."""
    code = error.errno if isinstance(error, OSError) else None
    if code in _SPACE_ERRORS:
        return code
    if "os error 28" in str(error) or 0 <= _free_bytes(directory) < _FULL_BELOW:
        return errno.ENOSPC
    return None


def write_error(error: BaseException, directory: str | Path) -> str:
    """A one-line description of a failed checkpoint write, the cause first (`Disk full`)."""
    code = full_disk(error, directory)
    if code is not None:
        return f"{_SPACE_ERRORS[code]} ({os.strerror(code)}; {_free_bytes(directory)} bytes free)"
    return f"Could not write the checkpoint ({type(error).__name__}: {first_line(error)})"


def _free_bytes(directory: str | Path) -> int:
    """Bytes this user may still write on the file system holding `directory` (-1 if it cannot be asked)."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return -1
    return stat.f_bavail * stat.f_frsize


def discard(staging: Path) -> None:
    """Delete a checkpoint that failed to write, and the staging directory if nothing else is in it: on a full disk,
    its partial files hold the space the run's logs and the next try need."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()


def staging_path(output_dir: str | Path, global_step: int) -> Path:
    return Path(output_dir) / STAGING_DIR / f"{PREFIX_CHECKPOINT_DIR}-{global_step}"


def publish(staging: Path, output_dir: str | Path) -> Path:
    """Move a fully written checkpoint from its staging directory to `output_dir`, replacing one of the same step
    (left by an earlier run that went past the checkpoint this one resumed from)."""
    write_manifest(staging)
    final = Path(output_dir) / staging.name
    replaced = None
    if final.exists():
        replaced = final.with_name(f"{final.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    staging.rename(final)
    if replaced is not None:
        shutil.rmtree(replaced)
        logger.info("Replaced %s, left by an earlier run, with this run's checkpoint.", final)
    with contextlib.suppress(OSError):  # another step's checkpoint is being written there
        staging.parent.rmdir()
    return final


def remove_incomplete(output_dir: str | Path) -> None:
    """Delete checkpoints whose writing was interrupted (a killed run), saying so."""
    staging_root = Path(output_dir) / STAGING_DIR
    if not staging_root.is_dir():
        return
    for path in sorted(staging_root.iterdir()):
        logger.warning("Removing %s: a checkpoint whose writing was interrupted; it was never complete.", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    staging_root.rmdir()


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` directories, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in output_dir.iterdir() if (m := _CHECKPOINT_NAME.match(path.name))]
    return sorted(found)


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int | None, keep: str | None = None) -> None:
    """`save_total_limit` as transformers applies it (the newest, plus `keep`: the best checkpoint), except that a
    good checkpoint is never deleted while every checkpoint kept is damaged."""
    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = [path for _, path in _checkpoints(Path(output_dir))]
    if len(checkpoints) <= save_total_limit:
        return
    kept = checkpoints[-save_total_limit:]
    if keep is not None:
        kept += [path for path in checkpoints if str(path) == str(keep) and path not in kept]
    # Newest first: the checkpoint just written is normally good, so one check (of headers only) settles it.
    if not any(checkpoint_problem(path) is None for path in reversed(kept)):
        good = [path for path in checkpoints if path not in kept and checkpoint_problem(path) is None]
        if good:
            logger.warning("Keeping %s beyond save_total_limit: every newer checkpoint is damaged.", good[-1])
            kept.append(good[-1])
    for path in checkpoints:
        if path not in kept:
            logger.info("Deleting %s (save_total_limit=%d).", path, save_total_limit)
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete `checkpoint-N` in `output_dir`; damaged ones are reported and skipped."""
    for _, path in reversed(_checkpoints(Path(output_dir))):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping damaged checkpoint %s: %s.", path, problem)
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> str | None:
    """Turn the recipe's `resume_from_checkpoint` (None, `auto` or a path) into a checkpoint path or None."""
    if resume_from_checkpoint in (None, "", "false", "False"):
        return None
    if resume_from_checkpoint == "auto":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info(
                "resume_from_checkpoint=auto: no complete checkpoint in %s, starting from scratch.", output_dir
            )
            return None
        newest = _checkpoints(Path(output_dir))[-1][1]
        if path != newest:
            logger.warning(
                "resume_from_checkpoint=auto: resuming from %s, the newest complete checkpoint (the newer ones are "
                "damaged, see above).",
                path,
            )
        else:
            logger.info("resume_from_checkpoint=auto: resuming from %s.", path)
        return str(path)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a directory.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint: {path} cannot be resumed from: {problem}.")
    return str(path)
