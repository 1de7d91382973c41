"""The composed prose prompt set (drafter_svc/train/general_prompts.py): reproducible, distinct,
balanced in any prefix, and readable by datagen's prompt loader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from drafter_svc.train import general_prompts
from drafter_svc.train.datagen import load_prompts


def test_prompts_are_reproducible_distinct_and_balanced():
    rows = general_prompts.compose(600, seed=3)
    assert rows == general_prompts.compose(600, seed=3)
    assert rows != general_prompts.compose(600, seed=4)
    assert general_prompts.compose(100, seed=3) == rows[:100]  # growing the set keeps the keys of the old rows
    texts = [r["turns"][0] for r in rows]
    assert len(set(texts)) == len(texts)
    assert all("{" not in t and "}" not in t for t in texts)  # every placeholder filled
    # Categories in turn: the first 60 rows hold ten of each of the six.
    assert set(Counter(r["category"] for r in rows[:60]).values()) == {10}
    with pytest.raises(ValueError, match="n must be"):
        general_prompts.compose(0)


def test_written_file_loads_as_a_train_prompt_set(tmp_path):
    out = tmp_path / "prompts" / "general-chat.jsonl"
    assert general_prompts.main(["--out", str(out), "-n", "12"]) == 0

    from transformers import AutoTokenizer

    from verifier_svc.target_loading import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))  # the packaged target's
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 12
    loaded = load_prompts([out], max_prompt_tokens=256, tokenizer=tokenizer)
    assert [k for k, _ in loaded] == [f"general-chat:{i}" for i in range(12)]
    assert tokenizer.decode(loaded[0][1]).count(rows[0]["turns"][0]) == 1  # the prompt, inside the chat template


def test_tasks_set_is_reproducible_distinct_and_balanced():
    rows = general_prompts.compose(500, seed=1, kind="tasks")
    assert rows == general_prompts.compose(500, seed=1, kind="tasks")
    assert general_prompts.compose(50, seed=1, kind="tasks") == rows[:50]
    texts = [r["turns"][0] for r in rows]
    assert len(set(texts)) == len(texts)
    assert all("{" not in t and "}" not in t for t in texts)
    counts = Counter(r["category"] for r in rows[:50])
    assert counts == {c: 10 for c in ("extraction", "rewriting", "reasoning", "stem", "humanities")}
    assert not any(" a a" in t or " a e" in t or " a o" in t for t in texts if "worked as" in t)  # articles agree


@pytest.mark.parametrize("kind", ["chat", "tasks"])
def test_committed_prompt_files_are_what_compose_writes(kind):
    # datagen keys answers by row: the committed files (and the archived answers keyed on them) must be
    # exactly what the generator writes, or a later -n would silently re-key rows already answered.
    path = Path(__file__).resolve().parents[1] / "data" / "prompts" / f"general-{kind}.jsonl"
    lines = path.read_text().splitlines()
    assert lines == [json.dumps(r) for r in general_prompts.compose(len(lines), kind=kind)]
