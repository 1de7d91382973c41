"""bench/gpu_check.py (what compose/gpu_check.sh runs on a GPU machine) works on the CPU: real
drafter and verifier services around tiny random models, speculation token-identical to draft
length 0 in both model worlds, and drafts partly accepted in the bigram world."""

import json

from bench import gpu_check


def test_gpu_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--vocab", "512", "--hidden", "64", "--layers", "2", "--prompts", "2",
                           "--new-tokens", "12", "--concurrency", "2", "--draft-lengths", "3,auto", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["lossless"], result
    bigram = result["worlds"]["bigram"]["modes"]["3"]["sequential"]
    assert 0 < bigram["accepted"] < bigram["proposed"], bigram  # partial acceptance: accept, reject, roll back
    assert result["worlds"]["random"]["modes"]["0"]["sequential"]["tokens_per_s"] > 0
