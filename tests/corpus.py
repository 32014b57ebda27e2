"""The real-model corpus: torchvision, timm and Hugging Face architectures end to end.

For each model: capture (region tree), dropout alone (eval output must stay bitwise equal),
then every registered technique together (dropout + BN→LN + init, and residual on named
plain blocks), a train- and an eval-mode forward, and an ONNX export + validation.

    python tests/corpus.py            # the whole corpus, as a table
    python tests/corpus.py --json     # the same, as JSON
    python tests/corpus.py resnet18   # models whose name contains a word

Random weights only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import graphtricks as gt
from graphtricks.io.inputs import make_example_inputs  # noqa: E402
from graphtricks.passes import PASSES  # noqa: E402

IMG = (2, 3, 64, 64)
IMG224 = (1, 3, 224, 224)


def _tv(name: str, **kw) -> Callable:
    return lambda: __import__("torchvision").models.get_model(name, weights=None, **kw)


def _timm(name: str, **kw) -> Callable:
    return lambda: __import__("timm").create_model(name, pretrained=False, **kw)


def _hf(config_cls: str, model_cls: str, **kw) -> Callable:
    def build():
        transformers = __import__("transformers")
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))

    return build


_SMALL_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)


@dataclass
class Entry:
    """One architecture of the corpus."""

    name: str
    build: Callable
    shape: tuple[int, ...]
    dtype: str = "float32"
    residual: list[str] = field(default_factory=list)  # plain blocks to wrap
    fast: bool = False  # part of the subset every CI run checks


CORPUS = [
    Entry("tv:resnet18", _tv("resnet18"), IMG),
    Entry("tv:resnet50", _tv("resnet50"), IMG),
    Entry("tv:mobilenet_v2", _tv("mobilenet_v2"), IMG),
    Entry("tv:mobilenet_v3_small", _tv("mobilenet_v3_small"), IMG, fast=True),
    Entry("tv:efficientnet_b0", _tv("efficientnet_b0"), IMG),
    Entry("tv:densenet121", _tv("densenet121"), IMG),
    Entry("tv:inception_v3", _tv("inception_v3", init_weights=False, aux_logits=False), (2, 3, 96, 96)),
    Entry("tv:googlenet", _tv("googlenet", init_weights=False, aux_logits=False), IMG),
    # auxiliary heads: extra outputs in train mode only, train_only.aux_logits2/1 of the train graph
    Entry("tv:googlenet-aux", _tv("googlenet", init_weights=False, aux_logits=True), IMG),
    Entry("tv:convnext_tiny", _tv("convnext_tiny"), IMG),
    Entry("tv:vit_b_16", _tv("vit_b_16", image_size=32), (1, 3, 32, 32)),
    Entry("tv:swin_t", _tv("swin_t"), IMG),
    Entry("tv:squeezenet1_0", _tv("squeezenet1_0"), IMG),
    Entry("tv:shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), IMG),
    Entry("tv:regnet_y_400mf", _tv("regnet_y_400mf"), IMG),
    Entry("tv:mnasnet0_5", _tv("mnasnet0_5"), IMG),
    # segmentation: a backbone whose ImageNet weights the builder would download unless told not to
    Entry("tv:lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large", weights_backbone=None, num_classes=4), IMG),
    # 224x224: the TorchScript exporter needs the 7x7 adaptive pool to divide its input.
    Entry("tv:vgg11_bn", _tv("vgg11_bn"), IMG224, residual=["features.4", "features.11"]),
    Entry("tv:alexnet", _tv("alexnet"), IMG224),
    Entry("timm:tf_efficientnetv2_b0", _timm("tf_efficientnetv2_b0", drop_path_rate=0.1), IMG, fast=True),
    Entry("timm:efficientnet_b0", _timm("efficientnet_b0"), IMG, fast=True),
    Entry("timm:convnext_atto", _timm("convnext_atto", drop_path_rate=0.1), IMG),
    Entry("timm:volo_d1_224", _timm("volo_d1_224", img_size=64), (2, 3, 64, 64)),  # F.fold → Col2Im
    Entry("timm:vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.1), (2, 3, 32, 32)),
    Entry("timm:deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8), (2, 3, 32, 32)),
    Entry("timm:regnetx_002", _timm("regnetx_002"), IMG),
    Entry("timm:mixer_s16_224", _timm("mixer_s16_224", img_size=32), (2, 3, 32, 32)),
    Entry("timm:lcnet_050", _timm("lcnet_050"), IMG),
    Entry("timm:ghostnet_050", _timm("ghostnet_050"), IMG),
    Entry("timm:resnet18d", _timm("resnet18d"), IMG),
    Entry("timm:mobilevitv2_050", _timm("mobilevitv2_050"), IMG),
    Entry("hf:bert", _hf("BertConfig", "BertModel", **_SMALL_TEXT), (2, 12), "int64", fast=True),
    Entry("hf:gpt2", _hf("GPT2Config", "GPT2Model", n_embd=64, n_layer=2, n_head=4, vocab_size=1000), (2, 12), "int64"),
    # tied wte/lm_head and transformers Conv1D layers: init sets the tie once and reports both names
    Entry("hf:gpt2-lm-head", _hf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, vocab_size=1000), (2, 12), "int64"),
    Entry("hf:llama", _hf("LlamaConfig", "LlamaModel", **_SMALL_TEXT), (2, 12), "int64"),
    Entry("hf:t5-encoder", _hf("T5Config", "T5EncoderModel", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=1000), (2, 12), "int64"),
    Entry("hf:distilbert", _hf("DistilBertConfig", "DistilBertModel", dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=1000), (2, 12), "int64", fast=True),
]


def _techniques(entry: Entry) -> list[gt.GraphtricksPass]:
    """Every registered technique, configured for this model."""
    configs = [
        ("residual", {"blocks": entry.residual}) if entry.residual else None,
        ("bn_to_ln", {}),
        ("dropout", {"p": 0.1}),
        ("init", {"scheme": "auto", "seed": 0}),
    ]
    return [PASSES[name](**cfg) for name, cfg in filter(None, configs) if name in PASSES]


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return next(v for v in (value.values() if isinstance(value, dict) else value) if isinstance(v, torch.Tensor))


def run_entry(entry: Entry, *, validate: bool = True, exporter: str = "dynamo") -> dict[str, Any]:
    """Run the whole check on one architecture; returns a row of the table (never raises)."""
    started = time.perf_counter()
    row: dict[str, Any] = {"model": entry.name, "ok": False}
    try:
        torch.manual_seed(0)
        model = entry.build().eval()
        high = getattr(getattr(model, "config", None), "vocab_size", 100)
        inputs = make_example_inputs([entry.shape], entry.dtype, seed=0, high=high)
        with torch.no_grad():
            reference = _first_tensor(model(*inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dropped = gt.rewrite(model, [gt.InsertDropout(0.1)], inputs)
            with torch.no_grad():
                row["eval_equal"] = bool(torch.equal(_first_tensor(dropped.model.eval()(*inputs)), reference))
            result = gt.rewrite(model, _techniques(entry), inputs)
        row["traced_fraction"] = round(result.report.traced_fraction, 3)
        row["regions"] = {
            "traced": sum(r.kind == "traced" for r in result.tree.regions()),
            "opaque": sum(r.kind == "opaque" for r in result.tree.regions()),
        }
        row["changes"] = result.report.changes_by_pass()
        rewritten = result.model
        rewritten.train()
        train_inputs = tuple(torch.cat([t, t]) for t in inputs)  # batch > 1 for any BatchNorm left
        _first_tensor(rewritten(*train_inputs)).float().mean().backward()
        rewritten.eval()
        with torch.no_grad():
            out = _first_tensor(rewritten(*inputs))
        row["eval_finite"] = bool(torch.isfinite(out).all())
        if validate:
            from graphtricks.onnx import export_pair, validate_pair

            with tempfile.TemporaryDirectory() as folder:
                exported = export_pair(rewritten, inputs, folder, exporter=exporter)
                row["exporter"] = exported.exporter
                report = validate_pair(rewritten, inputs, folder, device="cpu", seeds=(0,))
            row["validate"] = report.summary()
            row["validate_passed"] = report.passed
        row["ok"] = row["eval_equal"] and row["eval_finite"] and row.get("validate_passed", True)
    except Exception as e:  # a row per model, whatever breaks
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="only models whose name contains one of these")
    parser.add_argument("--json", action="store_true", help="print only JSON")
    parser.add_argument("--no-validate", action="store_true", help="skip ONNX export + validation")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="the ONNX exporter")
    args = parser.parse_args(argv)
    entries = [e for e in CORPUS if not args.words or any(w in e.name for w in args.words)]
    rows = []
    for entry in entries:
        rows.append(run_entry(entry, validate=not args.no_validate, exporter=args.exporter))
        if not args.json:
            r = rows[-1]
            changes = " ".join(f"{k}:{v}" for k, v in r.get("changes", {}).items())
            status = "ok" if r["ok"] else "FAIL"
            detail = r.get("error") or r.get("validate", "")
            print(f"{r['model']:32} {status:4} {r.get('exporter', ''):11} traced={r.get('traced_fraction', '-'):<6} {changes:48} {r['seconds']:7.1f}s  {detail}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{sum(r['ok'] for r in rows)}/{len(rows)} models passed")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CORPUS", "Entry", "run_entry"]
