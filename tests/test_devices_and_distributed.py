"""Large models on the meta device, text models, and DDP training of a rewritten model."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from tests.conftest import example

LLAMA_7B = [
    "--model-arg", "hidden_size=4096", "--model-arg", "num_hidden_layers=32", "--model-arg", "intermediate_size=11008",
    "--model-arg", "num_attention_heads=32", "--model-arg", "num_key_value_heads=32", "--model-arg", "vocab_size=32000",
]


def test_meta_device_plans_a_7b_llama_without_allocating_it():
    pytest.importorskip("transformers")
    started = time.perf_counter()
    result = CliRunner().invoke(
        app, ["rewrite", "hf:llama", "--device", "meta", "--input-shape", "1,16", *LLAMA_7B, "--dropout", "0.1", "--dry-run", "--json"]
    )
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["report"]["changes_by_pass"] == {"dropout": 32}  # one SiLU per LlamaMLP
    assert payload["out"] is None
    assert seconds < 60, f"planning took {seconds:.1f}s"


def test_meta_device_refuses_to_write():
    result = CliRunner().invoke(
        app, ["rewrite", "hf:llama", "--device", "meta", "--input-shape", "1,8", "--model-arg", "num_hidden_layers=1", "--out", "x"]
    )
    assert result.exit_code == 1 and "--dry-run" in result.output


def test_text_model_gets_token_ids(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bert"
    args = ["--model-arg", "num_hidden_layers=1", "--model-arg", "hidden_size=32", "--model-arg", "num_attention_heads=2",
            "--model-arg", "intermediate_size=64"]
    result = CliRunner().invoke(app, ["rewrite", "hf:bert", "--input-shape", "2,8", *args, "--dropout", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    recipe = gt.recipe.read_recipe(out / "recipe.toml")
    assert recipe.source["input_dtype"] == "int64" and recipe.source["token_high"] == 30522
    model = gt.load(out).eval()
    assert model(torch.randint(0, 30522, (2, 8))).last_hidden_state.shape == (2, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_steps(model: torch.nn.Module, rank: int, batch: int, steps: int, momentum: float = 0.0) -> list[float]:
    """SGD steps on this rank's own seeded batch; the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    gen = torch.Generator().manual_seed(100 + rank)
    data = torch.randn(batch, 3, 32, 32, generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model on both ranks; DDP also broadcasts rank 0's weights
        model, (x,) = example("models/plain_cnn.py:PlainCNN")
        rewritten = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,)).model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(rewritten)
        results[rank] = _train_steps(ddp, rank, batch=16, steps=8, momentum=0.9)
    finally:
        dist.destroy_process_group()


def test_ddp_trains_a_rewritten_model():
    if not dist.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_train_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        losses = results[rank]
        assert losses[-1] < losses[0], f"rank {rank} loss did not go down: {losses}"


def _fsdp_worker(rank: int, world: int, port: int, results) -> None:
    """FSDP2 per block, then the root, on a rewritten torchvision ResNet (gloo, CPU)."""
    from torch.distributed.fsdp import fully_shard

    torchvision = pytest.importorskip("torchvision")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(4, 3, 32, 32)
        rewritten = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,)).model.train()
        blocks = [block for layer in (rewritten.layer1, rewritten.layer2, rewritten.layer3, rewritten.layer4)
                  for block in layer]
        for block in blocks:  # each block is a called module: its unshard/reshard hooks run
            fully_shard(block)
        fully_shard(rewritten)
        results[rank] = (_train_steps(rewritten, rank, batch=8, steps=6), type(blocks[0]).__name__)
    finally:
        dist.destroy_process_group()


def test_fsdp2_per_block_trains_a_rewritten_resnet():
    pytest.importorskip("torchvision")
    if not dist.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_fsdp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        losses, block_type = results[rank]
        assert "BasicBlock" in block_type  # FSDP's own subclass of the user's block class
        assert losses[-1] < losses[0], f"rank {rank} loss did not go down: {losses}"
