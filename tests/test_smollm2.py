"""The packaged default target, SmolLM2-135M-Instruct, with the default drafter (issue 2 must-show
1 and issue 5 must-show 4): speculative greedy output is token-identical to target-only greedy
decoding on real eval prompts, for draft lengths 1..8 and with the scheduler on; and the
`dspark generate` CLI works end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_common.settings import GenerateSettings
from verifier_svc.decode_loop import GenerationRequest
from verifier_svc.local_stack import build_local_loop

# The first row of each file in shared/data/prompts/eval/ (copied so CI needs no sibling checkout).
EVAL_ROWS = Path(__file__).parent / "data" / "eval_first_rows.jsonl"


def eval_prompts() -> list[str]:
    return [json.loads(line)["turns"][0] for line in EVAL_ROWS.read_text().split("\n") if line.strip()]


@pytest.fixture(scope="module")
def stack():
    return build_local_loop(GenerateSettings(threads=1), profile=True)


@pytest.mark.slow
def test_greedy_identity_on_eval_prompts(stack):
    loop = stack.loop
    max_new = 12
    for text in eval_prompts():
        ids = stack.encode(text)
        base = loop.generate(GenerationRequest(ids, max_new, draft_length=0, stop_ids=stack.stop_ids)).token_ids
        for dl in [1, 2, 3, 4, 5, 6, 7, 8, "auto"]:
            got = loop.generate(GenerationRequest(ids, max_new, draft_length=dl, stop_ids=stack.stop_ids))
            assert got.token_ids == base, (text[:40], dl)
    assert loop.target.num_sessions == 0


@pytest.mark.slow
def test_generate_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "dspark_common.cli", "generate", "--prompt", "What is 2+3?", "--chat",
         "--max-new-tokens", "8", "--json", "--threads", "1"],
        capture_output=True, text=True, timeout=900, check=True,
    )
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(obj) >= {"token_ids", "text", "speculative"}
    assert len(obj["token_ids"]) == 8 or obj["finish_reason"] == "stop"
    spec = obj["speculative"]
    assert set(spec) >= {"rounds", "draft_tokens", "accepted_draft_tokens", "mean_accepted_length"}
    base = subprocess.run(
        [sys.executable, "-m", "dspark_common.cli", "generate", "--prompt", "What is 2+3?", "--chat",
         "--max-new-tokens", "8", "--json", "--threads", "1", "--draft-length", "0"],
        capture_output=True, text=True, timeout=900, check=True,
    )
    assert json.loads(base.stdout.strip().splitlines()[-1])["token_ids"] == obj["token_ids"]
