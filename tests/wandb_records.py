"""Reads back what an offline wandb run wrote: its history rows and the tables it logged.

wandb 0.31 writes an offline run as one `run-<id>.wandb` file of protobuf records in LevelDB's log format
(32 KiB blocks; each chunk has a 7-byte header: CRC, length, type), after a 7-byte `:W&B` file header. A table
with images is logged as an artifact whose files (the table JSON and one PNG per image) are staged under
`WANDB_DATA_DIR`; the records name each file's staged path.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(run_file: Path):
    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb run file"
    position, chunks = HEADER, []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if left_in_block < HEADER or (length == 0 and kind == 0):  # block trailer: padding
            position += left_in_block
            continue
        chunks.append(data[position + HEADER : position + HEADER + length])
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def run_file(wandb_dir: Path) -> Path:
    (path,) = Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")
    return path


def history(wandb_dir: Path) -> list[dict]:
    rows = []
    for record in records(run_file(wandb_dir)):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def tables(wandb_dir: Path, key: str) -> list[tuple[dict, dict[str, Path]]]:
    """Each logged version of table `key`, in order: its JSON and its files (path in the artifact -> staged file)."""
    found = []
    for record in records(run_file(wandb_dir)):
        if record.WhichOneof("record_type") != "artifact" or record.artifact.type != "run_table":
            continue
        if not record.artifact.name.endswith(f"-{key}"):
            continue
        files = {entry.path: Path(entry.local_path) for entry in record.artifact.manifest.contents}
        found.append((json.loads(files[f"{key}.table.json"].read_text()), files))
    return found
