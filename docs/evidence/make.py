"""Regenerate the evidence gallery: one experiment per technique on scikit-learn's digits.

    python docs/evidence/make.py                 # every experiment, into docs/evidence/<name>/
    python docs/evidence/make.py --only dropout-noisy --seeds 2

Each experiment writes ``report.html``, one PNG per figure and ``results.json``; ``summary.json``
collects the verdicts and the CPU seconds of each. Needs ``pip install -e ".[report]"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402  (the gallery's own models, beside this script)

from graphtricks.experiment import TrainConfig, experiment  # noqa: E402

R = HERE / "recipes"

# name → (model factory, variants, settings); the settings of issue 18's measurements
GALLERY = {
    "dropout-noisy": (models.WideMLP, [R / "dropout.toml"],
                      dict(config=TrainConfig(epochs=20, batch_size=16, lr=2e-3), train_size=300, label_noise=0.2)),
    "dropout-clean": (models.WideMLP, [R / "dropout.toml"],
                      dict(config=TrainConfig(epochs=20, batch_size=16, lr=2e-3), train_size=300)),
    "residual": (models.DeepPlainMLP, [R / "residual.toml"], dict(config=TrainConfig(epochs=5))),
    "init": (models.deep_plain_normal, [R / "init-he.toml"], dict(config=TrainConfig(epochs=3))),
    "bn-to-ln": (models.BNMLP, [R / "bn-to-ln.toml"],
                 dict(config=TrainConfig(epochs=2, batch_size=64), batch_sizes=(2, 8, 64))),
    "warmup-clip-schedule": (models.deep_residual, [R / "warmup.toml", R / "clip.toml", R / "cosine.toml"],
                             dict(config=TrainConfig(epochs=5, optimizer="sgd", lr=0.01))),
    "label-smoothing": (models.WideMLP, [R / "label-smoothing.toml"], dict(config=TrainConfig(epochs=30))),
    "l1-l2-head": (models.WideMLP, [R / "l2-head.toml", R / "l1-head.toml"],
                   dict(config=TrainConfig(epochs=20, batch_size=16, lr=2e-3), train_size=300, label_noise=0.2)),
    # issue 26: trained on digits 0–4; the held-out 5–9 are the unseen classes
    "mc-dropout": (models.wide_mlp_5, [R / "mc-dropout.toml"], dict(config=TrainConfig(epochs=20), known_classes=5)),
    # issue 26: identity shortcuts vs a zero-started branch gate, judged against identity, at three depths
    **{f"residual-gate-{depth}": (models.deep_plain(depth), [R / "residual.toml", R / "residual-zero-branch.toml"],
                                  dict(config=TrainConfig(epochs=2), baseline="residual"))
       for depth in (30, 100, 200)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(GALLERY), help="run only these experiments")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"seeds": args.seeds, "experiments": {}}
    started = time.process_time()
    for name in args.only or GALLERY:
        factory, variants, settings = GALLERY[name]
        t0 = time.process_time()
        print(f"== {name}", file=sys.stderr)
        result = experiment(factory, "digits", variants, seeds=args.seeds, model_name=f"{factory.__name__} ({name})",
                            out=args.out / name, force=True, progress=lambda s: print("  " + s, file=sys.stderr),
                            **settings)
        seconds = time.process_time() - t0
        summary["experiments"][name] = {
            "cpu_seconds": round(seconds, 1),
            "panels": [{k: p[k] for k in ("variant", "claim", "metric", "before_mean", "after_mean", "spread", "verdict", "figure")}
                       for p in result.panels]}
        for p in result.panels:
            print(f"  {p['variant']}: {p['claim']}: {p['before_mean']:.3g} → {p['after_mean']:.3g} "
                  f"(±{p['spread']:.2g}) {p['verdict']}", file=sys.stderr)
    summary["cpu_seconds"] = round(time.process_time() - started, 1)
    if not args.only:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"gallery: {summary['cpu_seconds']} CPU seconds", file=sys.stderr)


if __name__ == "__main__":
    main()
