"""The sequence-tiled MLP block (``modules.tiling``) equals the untiled one.

fp32 on CPU. The outputs are computed row by row either way, so they agree to the last bits
(1e-6); the weight gradients of the tiled block are sums of per-tile GEMMs instead of one GEMM
over all tokens, a different summation order: agreement to fp32 rounding of sums of ~100 terms,
checked at 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.models import build_model, tiny
from tunelab.modules.peft import apply_lora, get_adapter_params, set_trainable_params
from tunelab.modules.tiling import tiled
from tunelab.training.steps import wrap_layers

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(tile=None, *, checkpointing=False, dropout=0.0, lora=True, seed=0, dtype=torch.float32, compiled=False,
           offload=False, **arch):
    torch.manual_seed(seed)
    model = build_model(tiny(vocab_size=96, n_layers=3, **arch), device="cpu", dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():  # norms off 1, every weight random
            p.normal_(0, 0.2)
    if lora:
        apply_lora(model, "all-linear", rank=4, alpha=8, dropout=dropout)
        for p in get_adapter_params(model).values():
            torch.nn.init.normal_(p, std=0.1)
        set_trainable_params(model)
    model = wrap_layers(model, activation_checkpointing=checkpointing, compile_layers=compiled,
                        offload_activations=offload, mlp_tile_tokens=tile)
    if offload:  # move the tiny model's activations too (the default skips small tensors)
        model.layers[0].forward.args[0].min_bytes = 0
    return model


def _step(model, tokens, seed=3):
    torch.manual_seed(seed)  # the dropout draws
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("tile", [1, 5, 7, 64])
@pytest.mark.parametrize("case", ["lora", "full", "checkpointed", "gemma"])
def test_tiled_mlp_equals_untiled(tile, case):
    """Odd tile sizes (tokens 2 x 13 = 26: tiles of 5 and 7 leave a short last tile; 64 is
    untiled) give the same loss and every trainable gradient as the untiled model."""
    options = dict(lora=case != "full", checkpointing=case == "checkpointed")
    if case == "gemma":  # sandwich norms, GeGLU, 1 + weight norms
        options.update(sandwich_norm=True, hidden_act="gelu_tanh", norm_plus_one=True)
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    want_loss, want = _step(_model(**options), tokens)
    got_loss, got = _step(_model(tile, **options), tokens)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_compiled_offloaded_layers_with_tiles_equal_plain(monkeypatch):
    """Compiled layers (the tiled block is a graph break; the block itself compiled apart),
    checkpointed with offloaded inputs and kept attention: same loss and gradients over two
    steps (1e-5, as above; the kept attention also sums in another order). Compiled with
    inductor's capture and partitioner without code generation (aot_eager_decomp_partition), as
    tests/training/test_offload.py does."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition"))
    torch._dynamo.reset()
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(5))
    plain, tiled_model = _model(), _model(4, compiled=True, checkpointing=True, offload=True)
    for _ in range(2):
        for m in (plain, tiled_model):
            m.zero_grad(set_to_none=True)
        want_loss, want = _step(plain, tokens)
        got_loss, got = _step(tiled_model, tokens)
        torch.testing.assert_close(got_loss, want_loss, **TOL)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def test_dropout_masks_of_the_backward_are_the_forward_ones():
    """LoRA dropout inside the tiled block draws its masks tile by tile (so they differ from an
    untiled draw); the backward must rerun each tile with the forward's masks. Checked two ways:
    the gradient equals the loss's directional derivative (central differences with a step of
    1e-3 on an fp64 model, seed fixed so every evaluation draws the same masks: they agree to
    ~5e-5 relative, the step's truncation and the fp32 parts inside; a backward with fresh
    masks is ~30% off; checked at 1e-3), and a
    checkpointed model (whose rerun of the whole layer restores the RNG) gets the same gradients
    as an uncheckpointed one (1e-5, as above)."""
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    model = _model(5, dropout=0.2, dtype=torch.float64)
    _, grads = _step(model, tokens)
    params = dict(model.named_parameters())
    direction = {n: torch.randn_like(g) for n, g in grads.items()}
    eps = 1e-3

    def loss_at(sign):
        with torch.no_grad():
            for n, v in direction.items():
                params[n].add_(sign * eps * v)
        torch.manual_seed(3)
        with torch.no_grad():
            value = model(tokens).logsumexp(-1).mean().item()
        with torch.no_grad():
            for n, v in direction.items():
                params[n].sub_(sign * eps * v)
        return value

    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum((grads[n] * v).sum().item() for n, v in direction.items())
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic)
    plain_loss, plain = _step(_model(5, dropout=0.2), tokens)
    ckpt_loss, ckpt = _step(_model(5, dropout=0.2, checkpointing=True), tokens)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], **TOL, msg=name)


def test_tiles_hold_one_tile_of_intermediates():
    """The block runs on tiles of at most ``tile`` tokens in forward and in backward (that is
    what bounds its memory): record the row counts the MLP sees."""
    model = _model(4)
    seen = []
    model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    _step(model, torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(2)))
    assert seen == [4, 4, 2] * 2  # forward, then the backward's rerun tile by tile


def test_no_grad_and_generation_use_tiles_too():
    """Under no_grad (eval, generation) the tiled block is a plain loop over tiles: same logits."""
    tokens = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = _model(lora=False)(tokens), _model(3, lora=False)(tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_tiled_function_alone_with_input_gradient():
    """``tiled`` on its own: gradients of the input and of a parameter, leading dims kept."""
    w = torch.randn(6, 9, requires_grad=True)
    x = torch.randn(3, 5, 6, requires_grad=True)

    def fn(t):
        return torch.tanh(t @ w) * 2

    out = tiled(fn, x, 4, [w])
    assert out.shape == (3, 5, 9)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    ex, ew = torch.autograd.grad(fn(x), (x, w), g)
    torch.testing.assert_close(gx, ex, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, ew, **TOL)


def test_bad_tile_size_is_a_config_error():
    with pytest.raises(ConfigError, match="mlp_tile_tokens: 0 must be >= 1"):
        _model(0)
