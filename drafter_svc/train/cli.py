"""`dspark train <step>`: the DSpark training pipeline, one subcommand per step.

    datagen    regenerate answers with the target          (drafter_svc.train.datagen)
    cache      target features + top-k p_t per sequence    (drafter_svc.train.cache)
    fit        train the drafter                           (drafter_svc.train.fit)
    online     fit with the target beside it, on a GPU     (drafter_svc.train.online)
    calibrate  STS temperatures on held-out blocks         (drafter_svc.train.calibrate)
    average    a warm-started run interpolated with its init (drafter_svc.train.average)
    export     DeepSpec-format checkpoint directory        (drafter_svc.train.export)
    vocab      the checkpoint's draft vocabulary           (drafter_svc.train.vocab)
    validate   training metrics on held-out sequences      (drafter_svc.train.validate)

Each step module exposes add_arguments(parser) and run(args) (datagen: generate(args))."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

STEPS: dict[str, tuple[str, str]] = {
    "datagen": ("drafter_svc.train.datagen", "regenerate training answers with the target (resumable)"),
    "cache": ("drafter_svc.train.cache", "build the target cache: layer features + top-k next-token probs"),
    "fit": ("drafter_svc.train.fit", "train the DSpark drafter on the cache (resumable)"),
    "online": ("drafter_svc.train.online", "train on an accelerator with the target run beside the drafter (no cache)"),
    "calibrate": ("drafter_svc.train.calibrate", "fit STS confidence temperatures on held-out data"),
    "average": ("drafter_svc.train.average", "interpolate a warm-started fit run with the drafter it started from"),
    "export": ("drafter_svc.train.export", "write the DeepSpec-format checkpoint directory"),
    "vocab": ("drafter_svc.train.vocab", "choose the checkpoint's draft vocabulary from the training answers"),
    "validate": ("drafter_svc.train.validate", "held-out tau_prob and loss terms of a fit run or exported drafter"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="step", required=True)
    # Only the step being run is imported (as dspark's own CLI does), so `--help` stays instant.
    chosen = next((a for a in sys.argv[1:] if a in STEPS), None)
    for name, (module, help_text) in STEPS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_step_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(sp)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module = importlib.import_module(args._step_module)
    if args.step == "datagen":
        module.generate(args)
        return 0
    return int(module.run(args) or 0)
