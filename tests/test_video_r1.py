"""`python -m vlm_rl.data.video_r1`: Video-R1's JSON layout as rows vlm-rl reads."""

from __future__ import annotations

import json

import pytest

from vlm_rl.data.video_r1 import main


def test_video_r1_rows_become_questions_with_their_options_a_video_or_image_column_and_the_bare_answer(tmp_path):
    source = tmp_path / "Video-R1-data" / "Video-R1-260k.json"
    source.parent.mkdir()
    rows = [
        {"problem_id": 1, "problem": "What does the man do first?", "problem_type": "multiple choice",
         "options": ["A. sits", "B. runs"], "process": "<think>...</think>", "solution": "<answer>B</answer>",
         "path": "./LLaVA-Video-178K/clip.mp4", "data_type": "video", "data_source": "LLaVA-Video-178K"},
        {"problem_id": 2, "problem": "How many apples?", "problem_type": "numerical", "options": [],
         "solution": "<answer> 3 </answer>", "path": "./CLEVR/img.png", "data_type": "image"},
    ]  # fmt: skip
    source.write_text(json.dumps(rows))
    target = tmp_path / "data" / "train.jsonl"
    main([str(source), str(target)])
    video, image = [json.loads(line) for line in target.read_text().splitlines()]
    assert video == {
        "problem": "What does the man do first?\nOptions:\nA. sits\nB. runs\n"
        "Think in <think></think>, then give the letter of one option in <answer></answer>.",
        "videos": "../Video-R1-data/LLaVA-Video-178K/clip.mp4",  # from the JSON Lines file's directory
        "answer": "B",
        "problem_type": "multiple choice",
    }
    assert image["images"] == "../Video-R1-data/CLEVR/img.png" and "videos" not in image
    assert image["answer"] == "3" and "Options" not in image["problem"]
    source.write_text(json.dumps([{**rows[0], "data_type": "audio"}]))
    with pytest.raises(ValueError, match=r"^row 0: data_type 'audio' / problem_type 'multiple choice'; this conv"):
        main([str(source), str(target)])
