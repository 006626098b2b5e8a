"""Video-R1's data layout (Video-R1-260k.json, Video-R1-COT-165k.json) as rows vlm-rl reads.

    python -m vlm_rl.data.video_r1 data/video_r1/Video-R1-260k.json data/video_r1/train.jsonl

A Video-R1 row is `{"problem_type": "multiple choice", "problem": "...", "options": ["A. ...", "B. ..."],
"solution": "<answer>B</answer>", "path": "./LLaVA-Video-178K/.../clip.mp4", "data_type": "video", ...}`; image rows
(`data_type: image`) are mixed in. A recipe's `column_mapping` and `prompt_template` cannot join the `options` list
into the question, nor send `path` to the image or the video column by `data_type`, so this writes JSON Lines with
`problem` (the question, its options one a line, and what to put in `<answer>`), `images` or `videos` (the path,
relative to the input file's directory, as Video-R1's paths are), `answer` (what `solution`'s `<answer>` holds: the
accuracy rewards compare it with the policy's) and `problem_type`, for `recipes/qwen2_5_vl_7b_video_r1.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

# What to put in <answer>, by problem type (the reward that reads it: the recipe routes them by `problem_type`).
ANSWER_FORMS = {
    "multiple choice": "the letter of one option",
    "numerical": "the number",
    "regression": "the number",
    "OCR": "the text you read",
    "free-form": "a short answer",
}
DATA_TYPES = {"image": "images", "video": "videos"}
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def convert_row(row: dict, index: int, base: str) -> dict:
    """One Video-R1 row as a vlm-rl row (`index`: its position in the file, for errors)."""
    missing = [key for key in ("problem", "problem_type", "solution", "path", "data_type") if key not in row]
    if missing:
        raise ValueError(f"row {index}: no {', '.join(missing)}; a Video-R1 row has problem, problem_type, "
                         "options, solution, path and data_type.")  # fmt: skip
    if row["data_type"] not in DATA_TYPES or row["problem_type"] not in ANSWER_FORMS:
        raise ValueError(
            f"row {index}: data_type {row['data_type']!r} / problem_type {row['problem_type']!r}; this converter "
            f"knows data types {list(DATA_TYPES)} and problem types {list(ANSWER_FORMS)}."
        )
    question = row["problem"].strip()
    if row.get("options"):
        question += "\nOptions:\n" + "\n".join(option.strip() for option in row["options"])
    question += f"\nThink in <think></think>, then give {ANSWER_FORMS[row['problem_type']]} in <answer></answer>."
    answer = ANSWER.search(row["solution"])
    return {
        "problem": question,
        DATA_TYPES[row["data_type"]]: os.path.normpath(os.path.join(base, row["path"])),
        "answer": (answer.group(1) if answer else row["solution"]).strip(),
        "problem_type": row["problem_type"],
    }


def convert(source: Path, target: Path) -> int:
    """Convert a Video-R1 JSON file (an array of rows) to JSON Lines; the rows written."""
    rows = json.loads(source.read_text())
    base = os.path.relpath(source.parent, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w") as out:
        for index, row in enumerate(rows):
            out.write(json.dumps(convert_row(row, index, base)) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Video-R1's JSON file (e.g. Video-R1-260k.json)")
    parser.add_argument("target", type=Path, help="the JSON Lines file to write")
    args = parser.parse_args(argv)
    print(f"Wrote {convert(args.source, args.target)} rows to {args.target}.")


if __name__ == "__main__":
    main()
