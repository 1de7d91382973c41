"""`dspark train average`: a warm-started fit run's weights interpolated with those of the drafter it
started from, θ = (1 − α)·θ_init + α·θ_fit (WiSE-FT, Wortsman et al. 2022), written as a new run
directory that `calibrate`, `validate` and `export` take like any other.

Why: a continuation on a few thousand new sequences moves the drafter towards them and away from
what earlier sessions taught it; the interpolation keeps most of the gain and gives back the drift.
In the twenty-second session (docs/TRAINING.md) the fit alone lowered humaneval below its floor;
its α = 0.5 average (chosen on held-out data) raised all five eval files.
Given several α, each is scored by held-out τ_prob (`validate`'s figure, the caches' held-out split,
never the eval prompts) and the best is kept."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from drafter_svc import draft_vocab
from drafter_svc.checkpoint import read_weights
from drafter_svc.dspark_model import DSparkDrafter
from drafter_svc.train.fit import STATE_DIR, STATE_FILE, load_run_model
from dspark_common.errors import FailedPrecondition, InvalidRequest

# what the averaged run keeps of its source, besides config.json and the weights
COPIED = ("fit_options.json", "log.jsonl", draft_vocab.VOCAB_FILE, f"{STATE_DIR}/caches.json")


def interpolate(init: dict[str, torch.Tensor], fitted: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 − alpha)·init + alpha·fitted per tensor, in fp32 (the init is a 16-bit export), in fitted's dtype."""
    missing = sorted(k for k in fitted if k not in init or init[k].shape != fitted[k].shape)
    if missing:
        raise FailedPrecondition(f"the initial drafter lacks or mis-shapes {missing}")
    return {k: torch.lerp(init[k].float(), v.float(), alpha).to(v.dtype) for k, v in fitted.items()}


def average_run(run_dir: str | Path, out_dir: str | Path, alphas: list[float], *, init_dir: str | Path | None = None,
                score: Callable[[DSparkDrafter], float] | None = None, target=None) -> dict:
    """Write the interpolation of `run_dir` with its init (`fit_options.json`'s init_from unless
    `init_dir`) to `out_dir`. With several `alphas`, `score(model)` (higher is better; the model
    gets `target`'s frozen embed/lm_head; the CLI's is held-out τ_prob) picks one; the result
    (alpha, init, scores) is also written to `out_dir/average.json`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise InvalidRequest(f"alphas must be in [0, 1], got {alphas}")
    if len(alphas) > 1 and score is None:
        raise InvalidRequest("several alphas need a score to choose between them")
    if out_dir.resolve() == run_dir.resolve():
        raise InvalidRequest("the averaged run must go to a new directory, not over its source")
    if not (run_dir / STATE_DIR / STATE_FILE).is_file():
        raise FailedPrecondition(f"no training state in {run_dir}: not a fit run")
    if init_dir is None:
        options = run_dir / "fit_options.json"
        init_dir = (json.loads(options.read_text()) if options.is_file() else {}).get("init_from")
    if not init_dir:
        raise FailedPrecondition(f"{run_dir} was not warm-started (no init_from); name the initial drafter")
    state = torch.load(run_dir / STATE_DIR / STATE_FILE, weights_only=False, map_location="cpu")
    init = read_weights(Path(init_dir))

    scores: dict[float, float] = {}
    if len(alphas) > 1:
        model = load_run_model(run_dir, target)
        for a in alphas:
            model.load_state_dict(interpolate(init, state["model"], a), strict=False)
            scores[a] = float(score(model))
        alpha = max(alphas, key=lambda a: scores[a])
    else:
        alpha = alphas[0]

    (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.json", out_dir / "config.json")
    for name in COPIED:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
    # no optimizer or data order: an average is an end point, not a fit to resume
    torch.save({"model": interpolate(init, state["model"], alpha), "step": state["step"], "averaged": True,
                "options": state.get("options"), "config": state.get("config")}, out_dir / STATE_DIR / STATE_FILE)
    result = {"run": str(run_dir), "init": str(init_dir), "alpha": alpha,
              "scores": {str(a): round(s, 4) for a, s in scores.items()}}
    (out_dir / "average.json").write_text(json.dumps(result, indent=2))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a warm-started fit run directory")
    p.add_argument("--out", required=True, help="new run directory for the averaged weights")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="weight of the fitted drafter; several: the best by held-out tau_prob")
    p.add_argument("--init", default=None, help="the initial drafter (default: the run's init_from)")
    p.add_argument("--model", default="smollm2", help="target model spec (for held-out scoring)")
    p.add_argument("--cache", nargs="+", default=None,
                   help="caches whose held-out split scores the alphas (default: the run's, state/caches.json)")
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    score = target = None
    if len(args.alpha) > 1:
        from drafter_svc.train.cache import CacheReader
        from drafter_svc.train.validate import heldout_figures
        from verifier_svc.target_loading import load_target

        caches = args.cache or json.loads((Path(args.run) / STATE_DIR / "caches.json").read_text())
        reader = CacheReader(caches, "heldout")

        def score(model: DSparkDrafter) -> float:
            return heldout_figures(model, reader)["tau_prob"]

        target = load_target(args.model).model
    result = average_run(args.run, args.out, args.alpha, init_dir=args.init, score=score, target=target)
    print(json.dumps(result))
    return 0
