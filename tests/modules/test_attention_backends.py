"""Attention fast paths: flex_attention for packed rows, the SDPA backend policy switch.

CPU checks the math (fp32); the CUDA-only tests at the bottom check the fused kernels in bf16.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import tunelab.modules.transformer as transformer_mod
from tunelab.errors import ConfigError
from tunelab.models import build_model, tiny
from tunelab.modules import attention as A

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fused flex / cuDNN kernels)")


@pytest.fixture(autouse=True)
def _fresh_switches(monkeypatch):
    """Every test starts from the environment's defaults and leaves no override behind."""
    monkeypatch.delenv(A.SDPA_BACKEND_ENV, raising=False)
    monkeypatch.delenv(A.PACKED_ATTENTION_ENV, raising=False)
    A.set_attention_switches()
    yield
    A.set_attention_switches()


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch refuses flex backward on CPU up front (it has no fused CPU kernel); its reference
    implementation differentiates fine, so the tests lift that one check to compare gradients."""
    import torch.nn.attention.flex_attention as flex_mod

    monkeypatch.setattr(flex_mod, "_validate_device", lambda *args: None)


def packed_ids(lengths: list[list[int]]) -> torch.Tensor:
    """Rows of document lengths -> [b, s] ids 0, 0, ..., 1, 1, ... (each row sums to s)."""
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


def tiles(num: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """BlockMask's ordered (counts [b, 1, nq], indices [b, 1, nq, nk]) -> dense tiles [b, nq, n]."""
    b, _, nq = num.shape
    out = torch.zeros(b, nq, n, dtype=torch.bool)
    for i in range(b):
        for r in range(nq):
            out[i, r, idx[i, 0, r, : num[i, 0, r]].long()] = True
    return out


# ---------------------------------------------------------------- BlockMask from document ids
@pytest.mark.parametrize("layout", ["packed", "unsorted"])
def test_document_block_mask_equals_dense_mask_exhaustively(layout):
    """What the fused kernel computes from the BlockMask equals the dense mask at every (q, kv).

    The kernel skips tiles not listed, applies no mask inside "full" tiles and mask_mod inside
    "partial" ones, so the effective mask is full | (partial & mask_mod). Exact (bool) equality.
    Block size 16 on 2 x 100 tokens gives 7 x 7 tiles per row, the last one cut short.
    """
    torch.manual_seed(0)
    if layout == "packed":  # several documents, one spanning tiles, a padding tail with its own id
        doc = packed_ids([[7, 40, 3, 30, 20], [16, 16, 48, 20]])
    else:  # arbitrary ids: tiles stay correct (only possibly more partial tiles)
        doc = torch.randint(0, 3, (2, 100))
    s, bs = doc.shape[1], 16
    bm = A.document_block_mask(doc, block_size=bs)
    n = -(-s // bs)
    partial = tiles(bm.kv_num_blocks, bm.kv_indices, n)
    full = tiles(bm.full_kv_num_blocks, bm.full_kv_indices, n)
    assert not (partial & full).any()

    def expand(t):  # tiles [b, n, n] -> elements [b, s, s]
        return t.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :s, :s]

    qi = torch.arange(s)[:, None]
    ki = torch.arange(s)[None, :]
    mod = torch.stack([bm.mask_mod(torch.tensor(i), torch.tensor(0), qi, ki) for i in range(doc.shape[0])])
    effective = expand(full) | (expand(partial) & mod)
    dense = A.dense_document_mask(doc)[:, 0]
    assert torch.equal(effective, dense)

    if layout == "packed":  # non-decreasing ids: the very tiles torch's dense construction finds
        ref = create_block_mask(bm.mask_mod, doc.shape[0], None, s, s, device="cpu", BLOCK_SIZE=bs)
        assert torch.equal(full, tiles(ref.full_kv_num_blocks, ref.full_kv_indices, n))
        assert torch.equal(partial, tiles(ref.kv_num_blocks, ref.kv_indices, n))


def test_document_mask_picks_dense_on_cpu_and_honours_the_switch(monkeypatch):
    doc = packed_ids([[3, 5]])
    assert isinstance(A.document_mask(doc), torch.Tensor)  # CPU: dense mask, flex has no backward here
    assert isinstance(A.document_mask(doc, use_flex=True), A.BlockMask)
    monkeypatch.setenv(A.PACKED_ATTENTION_ENV, "nope")
    A.set_attention_switches()
    with pytest.raises(ConfigError, match=A.PACKED_ATTENTION_ENV):
        A.packed_attention()


# ---------------------------------------------------------------- flex == dense-mask SDPA
def test_flex_attention_equals_dense_mask_forward_and_backward(cpu_flex_backward):
    """Attention with a BlockMask == with the dense mask: GQA (4 q / 2 kv heads), 3 packed rows
    with several documents and a padding tail, 200 tokens (not a multiple of the 128 tile).
    Output and all gradients within 1e-5: same fp32 math, different reduction order only."""
    torch.manual_seed(0)
    attn = A.Attention(dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    doc = packed_ids([[50, 100, 30, 20], [130, 60, 10], [200]])
    b, s = doc.shape
    x = torch.randn(b, s, 64)
    pos = torch.cat([torch.arange(n) for n in [50, 100, 30, 20, 130, 60, 10, 200]]).view(b, s)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2) / 16))
    ang = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = ang.cos(), ang.sin()
    g = torch.randn(b, s, 64)

    def run(mask):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = attn(xi, cos, sin, mask=mask)
        (out * g).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}

    out_d, gx_d, gw_d = run(A.dense_document_mask(doc))
    out_f, gx_f, gw_f = run(A.document_block_mask(doc))
    torch.testing.assert_close(out_f, out_d, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx_f, gx_d, atol=1e-5, rtol=0)
    for name in gw_d:
        torch.testing.assert_close(gw_f[name], gw_d[name], atol=1e-5, rtol=0, msg=name)


def test_decoder_flex_path_equals_dense_path(monkeypatch):
    """The whole decoder with document_ids: flex BlockMask (forced on CPU) == dense mask, logits
    within 1e-5 (fp32, GQA tiny model, 2 layers sharing one BlockMask)."""
    torch.manual_seed(0)
    model = build_model(tiny(n_layers=2)).eval()
    doc = packed_ids([[20, 70, 38], [128]])
    pos = torch.cat([torch.arange(n) for n in [20, 70, 38, 128]]).view(2, 128)
    tokens = torch.randint(0, 1024, (2, 128))
    with torch.no_grad():
        dense = model(tokens, position_ids=pos, document_ids=doc)
        monkeypatch.setattr(transformer_mod, "document_mask", functools.partial(A.document_mask, use_flex=True))
        flex = model(tokens, position_ids=pos, document_ids=doc)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_decoder_flex_under_activation_checkpointing(monkeypatch, cpu_flex_backward):
    """Packed decoder forward + backward with non-reentrant checkpointing per layer (as the
    recipes wrap it; the BlockMask is built outside the checkpoint and shared): flex == dense,
    loss and every parameter gradient within 1e-5 (fp32)."""
    from tunelab.training.steps import wrap_layers

    torch.manual_seed(0)
    model = wrap_layers(build_model(tiny(n_layers=2)), activation_checkpointing=True, compile_layers=False)
    doc = packed_ids([[20, 70, 38], [100, 28]])
    pos = torch.cat([torch.arange(n) for n in [20, 70, 38, 100, 28]]).view(2, 128)
    tokens = torch.randint(0, 1024, (2, 128))
    labels = torch.randint(0, 1024, (2, 128))

    def run(use_flex):
        monkeypatch.setattr(transformer_mod, "document_mask", functools.partial(A.document_mask, use_flex=use_flex))
        model.zero_grad()
        logits = model(tokens, position_ids=pos, document_ids=doc)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_d, g_d = run(False)
    loss_f, g_f = run(True)
    torch.testing.assert_close(loss_f, loss_d, atol=1e-5, rtol=0)
    for name in g_d:
        torch.testing.assert_close(g_f[name], g_d[name], atol=1e-5, rtol=0, msg=name)


def _compiled_tiny_layer(seq: int):
    """A one-layer tiny model's decoder layer, a random [2, seq, dim] input with its RoPE tables,
    and the layer's forward compiled fullgraph with aot_eager behind a compile counter (CPU:
    tracing, not codegen). Returns (layer, x, cos, sin, counter, compiled)."""
    import torch._dynamo.testing

    torch.manual_seed(0)
    model = build_model(tiny(n_layers=1))
    layer = model.layers[0]
    x = torch.randn(2, seq, model.args.dim)
    cos, sin = model.rope(torch.arange(seq)[None].expand(2, -1), dtype=x.dtype)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return layer, x, cos, sin, counter, torch.compile(layer.forward, backend=counter, fullgraph=True)


def test_blockmask_in_compiled_layer_no_graph_break_no_recompile():
    """A compiled decoder layer takes a fresh BlockMask every call (new ids, new mask_mod
    closure) as one graph and compiles once (aot_eager on CPU: the tracing, not the kernel);
    forward only, as CPU flex has no backward. Output within 1e-5 of the dense path."""
    layer, x, cos, sin, counter, compiled = _compiled_tiny_layer(seq=128)
    with torch.no_grad():
        for n_docs in (3, 5, 9):
            doc = torch.sort(torch.randint(0, n_docs, (2, 128)), dim=1).values
            out = compiled(x, cos, sin, mask=A.document_block_mask(doc))
            torch.testing.assert_close(out, layer(x, cos, sin, mask=A.dense_document_mask(doc)), atol=1e-5, rtol=0)
    assert counter.frame_count == 1


# ---------------------------------------------------------------- SDPA policy
@pytest.fixture
def sdpa_spy(monkeypatch):
    """(seen, real_sdpa): every SDPA call from here on appends (k/v heads, enable_gqa) to ``seen``."""
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q_, k_, v_, *args, **kwargs):
        seen.append((k_.shape[1], kwargs.get("enable_gqa", False)))
        return real_sdpa(q_, k_, v_, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen, real_sdpa


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_native_gqa_equals_expanded_kv(sdpa_spy, backend):
    """enable_gqa=True (no k/v copies) == repeat_interleave'd k/v: output and q/k/v gradients
    within 1e-5 (fp32; torch's CPU kernels, same math, different grouping of the sums)."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 64, 16)
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    g = torch.randn(2, 8, 64, 16)
    seen, _ = sdpa_spy

    def run(policy):
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        out = A.causal_attention(qi, ki, vi, policy=A.parse_sdpa_backend(policy))
        (out * g).sum().backward()
        return out.detach(), qi.grad, ki.grad, vi.grad

    native = run(backend)
    expanded = run("auto")
    assert seen == [(2, True), (8, False)]  # the native path really handed 2 kv heads to SDPA
    for a, b in zip(native, expanded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_auto_hands_grouped_kv_only_where_the_kernels_take_them(monkeypatch):
    """auto: enable_gqa=True for bf16/fp16 CUDA tensors on compute capability 8.0+ (flash and
    cuDNN take grouped k/v), expanded copies for CPU tensors, fp32 and older GPUs."""
    import types

    for major, dtype, device, want in ((9, torch.bfloat16, "cuda", True), (8, torch.float16, "cuda", True),
                                       (7, torch.float16, "cuda", False), (9, torch.float32, "cuda", False),
                                       (9, torch.bfloat16, "cpu", False)):
        monkeypatch.setattr(A, "_capability_at_least_8", lambda index, major=major: major >= 8)
        q = types.SimpleNamespace(is_cuda=device == "cuda", dtype=dtype, device=torch.device(device, 0))
        assert A._gqa_kernels(q) == want, (major, dtype, device)


def test_policy_parses_every_value():
    auto = A.parse_sdpa_backend("auto")
    assert auto.backends is None and not auto.native_gqa
    for name, first in [("cudnn", A.SDPBackend.CUDNN_ATTENTION), ("flash", A.SDPBackend.FLASH_ATTENTION),
                        ("efficient", A.SDPBackend.EFFICIENT_ATTENTION), ("math", A.SDPBackend.MATH)]:
        policy = A.parse_sdpa_backend(f" {name.upper()} ")
        assert policy.name == name and policy.backends[0] == first
        assert len(set(policy.backends)) == 4  # the others stay enabled as fallbacks
        assert policy.native_gqa == (name in ("cudnn", "flash"))


def test_bad_switch_value_is_one_line_naming_switch_and_values(monkeypatch):
    monkeypatch.setenv(A.SDPA_BACKEND_ENV, "fastest")
    A.set_attention_switches()
    with pytest.raises(ConfigError) as err:
        build_model(tiny(n_layers=1))  # fails when the model is built, before any step
    msg = str(err.value)
    assert "\n" not in msg and "TUNELAB_SDPA_BACKEND" in msg and "'fastest'" in msg
    assert all(v in msg for v in A.SDPA_BACKEND_CHOICES)


def test_switch_is_read_once(monkeypatch):
    monkeypatch.setenv(A.SDPA_BACKEND_ENV, "flash")
    A.set_attention_switches()
    assert A.sdpa_policy().name == "flash"
    monkeypatch.setenv(A.SDPA_BACKEND_ENV, "math")
    assert A.sdpa_policy().name == "flash"  # cached: a compiled graph never sees it change
    A.set_attention_switches("efficient")
    assert A.sdpa_policy().name == "efficient"


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
def test_policy_sets_the_priority_during_the_call_only(monkeypatch, backend):
    """While SDPA runs, torch's backend priority starts with the chosen backend (the CUDA
    dispatcher walks that order; CPU only has flash/math and ignores it) and every backend stays
    enabled; afterwards torch's previous order is back."""
    before = torch._C._get_sdp_priority_order()
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch._C._get_sdp_priority_order(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 4, 16, 8)
    k = v = torch.randn(1, 2, 16, 8)
    A.causal_attention(q, k, v, policy=A.parse_sdpa_backend(backend))
    (order, *enabled), = seen
    assert order[0] == int(A.parse_sdpa_backend(backend).backends[0]) and all(enabled)
    assert torch._C._get_sdp_priority_order() == before


def test_policy_traces_into_a_compiled_layer():
    """sdpa_kernel(..., set_priority=True) inside a compiled layer: one graph (fullgraph), same
    output and gradients as eager within 1e-5 (aot_eager on CPU: tracing, not codegen)."""
    A.set_attention_switches("cudnn")
    layer, x, cos, sin, counter, compiled = _compiled_tiny_layer(seq=64)
    out = compiled(x, cos, sin)
    out.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref = layer(x, cos, sin)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for got, want in zip(grads, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert counter.frame_count == 1


def test_capability_is_marked_constant_as_the_decorator_would():
    """_capability_at_least_8 carries what torch.compiler.assume_constant_result sets (set by hand
    so that importing tunelab does not import torch._dynamo)."""
    def probe(index):
        return True

    marked = torch.compiler.assume_constant_result(probe)
    names = {k for k in vars(marked) if k.startswith("_dynamo")}
    assert names and all(getattr(A._capability_at_least_8, k) == getattr(marked, k) for k in names)


def test_attention_bench_smoke():
    """bench/attention_bench.py --smoke runs every variant on CPU and prints one result line each."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "bench" / "attention_bench.py"), "--smoke"],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin", "TUNELAB_COMMIT": "test",
                               # where tunelab is found through PYTHONPATH (the GPU machine), keep it
                               **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bench_path = [r["variant"] for r in rows]
    assert bench_path == ["causal/auto", "causal/cudnn", "causal/flash", "causal/efficient", "packed/flex",
                          "packed/dense_sdpa"]
    for row in rows:
        assert row["ms"] > 0 and row["profile"] == "attention" and row["commit"] == "test", row
    assert rows[4]["passes"] == "fwd" and rows[4]["mask_ms"] > 0


# ---------------------------------------------------------------- CUDA only
def _packed_batch(device):
    doc = packed_ids([[300, 500, 700, 300, 248], [1024, 900, 124]]).to(device)
    lengths = [300, 500, 700, 300, 248, 1024, 900, 124]
    pos = torch.cat([torch.arange(n) for n in lengths]).view(2, 2048).to(device)
    tokens = torch.randint(0, 1024, (2, 2048), device=device)
    return tokens, pos, doc


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@pytest.mark.parametrize("wrapped", ["eager", "checkpoint+compile"])
def test_cuda_flex_matches_dense_bf16(wrapped):
    """Packed rows on the GPU: the compiled flex kernel == dense-mask SDPA, logits and every
    gradient, in bf16, with eager layers and with layers wrapped as the recipes do (checkpoint +
    compile). Relative error (norm of the difference / norm) <= 2e-2: bf16 keeps 8 bits and
    the two kernels round differently; a wrong mask gives errors of order 1."""
    from tunelab.training.steps import wrap_layers

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model(tiny(n_layers=2, max_seq_len=2048), device=device, dtype=torch.bfloat16)
    if wrapped != "eager":
        wrap_layers(model, activation_checkpointing=True, compile_layers=True)
    tokens, pos, doc = _packed_batch(device)
    g = torch.randn(2, 2048, 1024, device=device)

    def run(path):
        A.set_attention_switches(packed=path)
        model.zero_grad()
        logits = model(tokens, position_ids=pos, document_ids=doc)
        (logits.float() * g).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    dense, g_dense = run("sdpa")
    flex, g_flex = run("flex")
    assert _rel(flex, dense) <= 2e-2
    for (name, _), a, b in zip(model.named_parameters(), g_flex, g_dense):
        assert _rel(a, b) <= 2e-2, name


@cuda
def test_cuda_auto_hands_grouped_kv_in_a_compiled_layer(sdpa_spy):
    """On an sm80+ GPU in bf16 the auto path gives SDPA the 8 kv heads (enable_gqa) also inside a
    compiled layer (one graph: the capability check is a traced constant), and equals the
    expanded-k/v path within bf16 noise."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("grouped k/v are handed over on compute capability 8.0+ only")
    seen, real_sdpa = sdpa_spy
    torch.manual_seed(0)
    q = torch.randn(2, 32, 256, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch._dynamo.reset()
    compiled = torch.compile(A.causal_attention, fullgraph=True)
    out = compiled(q, k, v)
    assert seen == [(8, True)]
    expanded = real_sdpa(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    torch.testing.assert_close(out, expanded, atol=2e-2, rtol=2e-2)
    torch._dynamo.reset()


@cuda
@pytest.mark.skipif(not torch.backends.cudnn.is_available(), reason="cuDNN is not available")
def test_cuda_cudnn_policy_runs_cudnn_and_matches_math():
    """TUNELAB_SDPA_BACKEND=cudnn on 2 x 32 / 8 heads x 512 x 128 in bf16: the cuDNN kernel runs
    (with grouped k/v) and agrees with the fp32 math reference within 2e-2 (bf16 output)."""
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(2, 32, 512, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 8, 512, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 8, 512, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = A.causal_attention(q, k, v, policy=A.parse_sdpa_backend("cudnn"))
        out.float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert any("cudnn_attention" in n for n in names), sorted(n for n in names if "scaled_dot" in n)
    ref = A.causal_attention(q.float(), k.float(), v.float(), policy=A.parse_sdpa_backend("math"))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
