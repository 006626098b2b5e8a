"""The model-family support table in docs/models.md, generated from the registered adapters.

Each column is a claim that the per-family tests check for exactly these families and flags
(tests/test_training.py, tests/test_logprobs.py, tests/test_freezing.py, tests/test_models.py,
tests/test_sharing.py, tests/test_prefill.py, tests/test_video.py), and
tests/test_docs.py checks the table in the docs equals this one: python -m vlm_rl.models.support --write
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from vlm_rl.models.families import registered_adapters

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def support_table() -> str:
    """Markdown table: one row per registered family."""
    lines = [
        "| Family (`tiny:<name>`) | Model types | Image rows | Text-only rows mixed in | Several images per row "
        "| Video rows | Freezing (vision / projector / LM) | Image-size bounds | Prompt once per group "
        "| Image once per forward | Notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, adapter in sorted(registered_adapters().items()):
        lines.append(
            f"| {adapter.label} (`{name}`) | {', '.join(f'`{t}`' for t in adapter.model_types)} | ✅ "
            f"| {'✅' if adapter.text_only else '—'} | {'✅' if adapter.multi_image else '—'} "
            f"| {'✅' if adapter.video_keys else '—'} | ✅ "
            f"| {' / '.join(f'`{b}`' for b in adapter.image_size_bounds) or '—'} "
            f"| {'✅' if adapter.shares_prompts else '—'} | {'✅' if adapter.image_feature_fields else '—'} "
            f"| {adapter.notes} |"
        )
    return "\n".join(lines)


def documented_table(path: Path = DOC) -> str:
    """The table between the markers in docs/models.md."""
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), path.read_text(), re.S)
    if match is None:
        raise ValueError(f"{path} has no {START} ... {END} block.")
    return match.group(1)


def write_table(path: Path = DOC) -> None:
    text = path.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    path.write_text(text[:start] + "\n" + support_table() + "\n" + text[end:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="Rewrite the table in docs/models.md.")
    if parser.parse_args().write:
        write_table()
    else:
        print(support_table())
