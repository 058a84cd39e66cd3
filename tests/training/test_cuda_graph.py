"""CUDA-graph replay of the micro-batch forward + backward (training/cuda_graph.py).

On CUDA (skipped on CPU; recorded in the H200 CUDA test log): a tiny LoRA model trained three
optimizer steps with gradient accumulation 2, checkpointing, with and without offloading,
gives the same losses and adapters replayed as eagerly (fp32: the same kernels in the same
order, so the tolerance only covers cuBLAS picking another algorithm inside the capture).
On CPU: the recipe rejects dropout with cuda_graph, and the pieces that do not need a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.modules.peft import get_adapter_params
from tunelab.training.steps import loss_sum, micro_batch_backward, optimizer_step


def _train(make, device, cuda_graph: bool, offload: bool = False, steps: int = 3):
    model = make(device, offload)
    if offload:
        model.layers[0].forward.args[0].min_bytes = 0  # the tiny model's inputs are a few KiB
    params = list(get_adapter_params(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    backward = micro_batch_backward(model, params, torch.device(device), cuda_graph=cuda_graph)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        batches = [{"tokens": torch.randint(0, 96, (2, 32), generator=gen),
                    "labels": torch.randint(0, 96, (2, 32), generator=gen)} for _ in range(2)]
        n_labels = sum(b["labels"].numel() for b in batches)
        loss = sum(backward(b, n_labels) for b in batches)
        losses.append(loss.item() / n_labels)
        optimizer_step(optimizer, scheduler, step=len(losses), loss=losses[-1], grad_norm=0.0, last_saved=None,
                       grads_in_place=cuda_graph)
    return losses, {k: v.detach().clone() for k, v in get_adapter_params(model).items()}, backward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_graph_replay_matches_eager_training(tiny_lora_model, offload):
    eager_losses, eager_params, _ = _train(tiny_lora_model, "cuda", cuda_graph=False, offload=offload)
    graph_losses, graph_params, graphed = _train(tiny_lora_model, "cuda", cuda_graph=True, offload=offload)
    assert graphed.step is not None and graphed.step.graph is not None  # it was captured and replayed
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for k in eager_params:
        torch.testing.assert_close(graph_params[k], eager_params[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_batch_of_other_shape_runs_eagerly(tiny_lora_model, capsys):
    model = tiny_lora_model("cuda")
    params = list(get_adapter_params(model).values())
    backward = micro_batch_backward(model, params, torch.device("cuda"), cuda_graph=True)
    short = {"tokens": torch.randint(0, 96, (2, 16)), "labels": torch.randint(0, 96, (2, 16))}
    long = {"tokens": torch.randint(0, 96, (2, 32)), "labels": torch.randint(0, 96, (2, 32))}
    backward(long, 64)
    for p in params:
        p.grad.zero_()
    loss = backward(short, 32)
    assert "run eagerly" in capsys.readouterr().out
    expected = tiny_lora_model("cuda")
    assert loss.item() == pytest.approx(loss_sum(expected, short, torch.device("cuda")).item(), rel=1e-5)


def test_cpu_training_path_is_the_eager_one(tiny_lora_model):
    # on CPU the recipe switches cuda_graph off; micro_batch_backward(eager) is what runs
    losses, _, backward = _train(tiny_lora_model, "cpu", cuda_graph=False, steps=2)
    assert len(losses) == 2 and all(l > 0 for l in losses)
    assert not hasattr(backward, "step")


def test_grads_in_place_keeps_the_buffers():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    buffer = p.grad
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    optimizer_step(optimizer, scheduler, step=1, loss=1.0, grad_norm=1.0, last_saved=None, grads_in_place=True)
    assert p.grad is buffer and torch.equal(buffer, torch.zeros(3))
    optimizer_step(optimizer, scheduler, step=2, loss=1.0, grad_norm=1.0, last_saved=None)
    assert p.grad is None
