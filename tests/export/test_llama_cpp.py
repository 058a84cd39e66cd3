"""The exported files run in llama.cpp itself (llama-cpp-python, built from source in CI).

* f16 / bf16: llama.cpp's logits on a prompt match tunelab's fp32 logits within the weight
  type's tolerance (weights are stored rounded and llama.cpp's CPU matmuls round activations
  to f16, each a 2**-11 relative error; compared as logits, since tiny random models have
  near-ties that make greedy ids a poor check).
* q8_0 / q4_k_m: llama.cpp's logits match tunelab running the file's own dequantized weights
  (within llama.cpp's 8-bit activation rounding), and greedy agreement with tunelab's fp32
  ``generate`` is printed as rates (with a loose floor).
* Tokenizers: llama.cpp's tokenizer (from the GGUF vocabulary alone) gives tunelab's ids.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from .oracle import llama_cpp_or_skip

llama_cpp = llama_cpp_or_skip()
import gguf  # noqa: E402 (after the skip: the gguf package comes with the dev extra)

from tunelab.data.tokenizers import load_tokenizer  # noqa: E402
from tunelab.models import from_pretrained  # noqa: E402
from tunelab.training.export import export_gguf  # noqa: E402
from tunelab.modules.generation import generate  # noqa: E402

WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of 256: q4_k_m holds real K-quants
# Bound on |logit difference| relative to the largest |logit| of the prompt. f16: measured
# ~8e-4 on these 2-layer models (two 2**-11 roundings per matmul, accumulated over the layers);
# 4e-3 leaves ~5x room, while q/k rows left in HF order put it at 4e-2 to 6e-2. bf16
# weights keep 8 significant bits instead of 11 (8x the rounding): bound 8x as wide.
REL_TOL = {"f16": 4e-3, "bf16": 3.2e-2}
# What llama.cpp's gemma3 hard-codes: every 6th layer global and query_pre_attn_scalar = head_dim
LLAMA_CPP_LAYOUT = {"gemma3": dict(num_hidden_layers=6, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention"] * 5 + ["full_attention"]),
                    "qwen3_moe": dict(mlp_only_layers=[]),  # llama.cpp's qwen3moe: every layer MoE
                    # head_dim 64 at WIDE's width: 48 rotary dims, 24 factors each
                    "phi3_longrope": dict(rope_scaling=dict(rope_type="longrope", original_max_position_embeddings=32,
                                                            short_factor=[1.0 + 0.02 * i for i in range(24)],
                                                            long_factor=[1.0 + 0.25 * i for i in range(24)]))}


@pytest.fixture
def open_llama():
    """``open_llama(path, **kw) -> llama_cpp.Llama``; closed at teardown (its __del__ fails at
    interpreter exit otherwise)."""
    opened = []

    def make(path, **kw):
        kw = dict(n_ctx=256, n_threads=2, n_batch=256, verbose=False, **kw)
        llm = llama_cpp.Llama(model_path=str(path), **kw)
        opened.append(llm)
        return llm

    yield make
    for llm in opened:
        llm.close()


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # [n, vocab]


def _tunelab_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def _prompt(tok, n_tokens: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    words = "add the numbers reverse word apple river stone window sort largest count letters".split()
    ids = tok.encode(" ".join(rng.choice(words, size=n_tokens)), add_bos=True)
    return ids[:n_tokens]


@pytest.mark.parametrize("kind,tokenizer,n_tokens,dtype", [
    ("llama2", "sentencepiece", 24, "f16"),
    ("llama3", "tiktoken", 24, "f16"),
    ("llama3_1", "tiktoken", 120, "f16"),  # past original_max_position_embeddings=64: scaled rope matters
    ("llama3_2", "tiktoken", 24, "f16"),   # tied embeddings
    ("llama3", "tiktoken", 24, "bf16"),
    ("mistral", "sentencepiece", 24, "f16"),  # Mistral 7B v0.3's layout: a llama file for llama.cpp
    ("qwen2", "tiktoken", 24, "f16"),  # llama.cpp's qwen2: q/k/v biases, rotate-half rope, tied embeddings
    ("qwen3", "tiktoken", 24, "f16"),  # llama.cpp's qwen3: q/k norms, rotate-half rope, tied embeddings
    ("gemma3", "sentencepiece", 40, "f16"),  # 1+w norms stored +1, GeGLU, window 16 < 40 tokens
    # fused qkv / gate_up, partial rotary, longrope: 40 tokens past the original 32, and llama.cpp's
    # context (256) too, so both run the long factors
    ("phi3_longrope", "tiktoken", 40, "f16"),
    ("qwen3_moe", "tiktoken", 24, "f16"),  # stacked experts as ffn_*_exps, the router as ffn_gate_inp
    # sinks, biases, YaRN, a window of 8 < 24 tokens, interleaved gate/up experts with biases;
    # and the same from the Hub's MXFP4 layout
    ("gpt_oss", "tiktoken", 24, "f16"),
    ("gpt_oss_mxfp4", "tiktoken", 24, "f16"),
])
def test_logits_match_tunelab(export_checkpoint, tmp_path, open_llama, kind, tokenizer, n_tokens, dtype):
    ckpt = export_checkpoint(kind, tokenizer, **WIDE, **LLAMA_CPP_LAYOUT.get(kind, {}))
    path = export_gguf(ckpt, tmp_path / "m.gguf", dtype=dtype)
    tok = load_tokenizer(ckpt)
    ids = _prompt(tok, n_tokens)
    model = from_pretrained(ckpt)
    ref = _tunelab_logits(model, ids)
    got = _llama_logits(open_llama(path, logits_all=True), ids)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    print(f"\n[llama.cpp {dtype} {kind}/{tokenizer}] max |logit diff| {diff:.2e} (max |logit| {scale:.2f})")
    assert diff <= REL_TOL[dtype] * scale, (diff, scale)
    if kind == "llama3_1":
        # negative control: without the rope_freqs factors the logits move far outside the bound
        model.rope.rope_scaling = None
        model.rope.reset_parameters()
        unscaled = _tunelab_logits(model, ids)
        assert float(np.abs(got - unscaled).max()) > 4 * REL_TOL[dtype] * scale


@pytest.mark.parametrize("tokenizer", ["tiktoken", "sentencepiece", "hf_json", "qwen_json"])
def test_llama_cpp_tokenizer_matches_tunelab(export_checkpoint, tmp_path, open_llama, random_text, tokenizer):
    """llama.cpp, reading only the GGUF vocabulary, tokenizes random text as tunelab does
    (BOS added, special-token text kept as text) and detokenizes back to the text; Qwen's
    tokenizer.json (single digits) as llama.cpp's qwen2 pre-tokenizer."""
    kind = {"sentencepiece": "llama2", "qwen_json": "qwen2"}.get(tokenizer, "llama3")
    ckpt = export_checkpoint(kind, tokenizer)
    path = export_gguf(ckpt, tmp_path / "m.gguf")
    tok = load_tokenizer(ckpt)
    llm = open_llama(path, vocab_only=True)
    for seed in range(30):
        text = random_text(seed, n_words=40)
        if seed % 5 == 0:
            text += " <|eot_id|></s>"  # typed special-token text stays text
        want = tok.encode(text, add_bos=True)
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == want, text
        body = want[1:] if tok.bos_id is not None else want  # Qwen's tokenizer has no BOS
        back = llm.detokenize(body).decode("utf-8")
        if tokenizer == "sentencepiece":  # llama.cpp keeps the dummy-prefix space sentencepiece drops
            back = back.removeprefix(" ")
        assert back == tok.decode(body)


def _greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def _dequantized_model(ckpt, gguf_path):
    """tunelab's model carrying the GGUF file's own (dequantized) weights, q/k rows put back in
    HF order (llama files), experts stacked again: the oracle for what llama.cpp computes from
    a quantized file."""
    from tunelab.models.gguf import export as export_mod

    model = from_pretrained(ckpt)
    a = model.args
    to_native = {v: k for k, v in export_mod._TOP_GGUF.items()}
    names = model.state_dict()
    for i in range(a.n_layers):  # (ffn_up is up_proj or, in phi3, gate_up_proj: the model's own)
        to_native.update({f"blk.{i}.{v}": f"layers.{i}.{k}" for k, v in export_mod._LAYER_GGUF.items()
                          if f"layers.{i}.{k}" in names})
    state, halves = {}, {}  # halves: an MoE layer's gate / up experts, stacked again as gate_up_proj
    for t in gguf.GGUFReader(gguf_path).tensors:
        if t.name == "rope_freqs.weight":
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        for leaf, n in (("attn_q.weight", a.n_heads), ("attn_k.weight", a.n_kv_heads)):
            if t.name.endswith(leaf) and export_mod.GGUF_ARCH[a.model_type] == "llama":
                # undo permute_for_llama_cpp: (n, half, 2, in) -> (n, 2, half, in)
                w = w.reshape(n, w.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        block, _, leaf = t.name.partition(".")[2].partition(".")
        if leaf in export_mod._EXPERTS_GGUF:
            native, half = export_mod._EXPERTS_GGUF[leaf]
            native = f"layers.{block}.{native}"
            if half is None:
                state[native] = w
            else:
                halves.setdefault(native, {})[half] = w
            continue
        state[to_native[t.name]] = w
    for native, parts in halves.items():
        state[native] = torch.cat([parts[0], parts[1]], dim=1)
    model.load_state_dict(state, strict=True)
    return model


# llama.cpp multiplies q8_0 / k-quant weights with activations quantized to 8 bits per
# 32-element block (~0.6% RMS error per element for Gaussian activations), so against tunelab
# running the file's own weights the largest of 80 x 1024 logits differs by ~1.5% of the logit
# scale (measured 1.3e-2 to 2.3e-2); bound 5e-2. A misread block layout, scale or tensor is off
# by the logit scale itself.
QUANT_REL_TOL = 5e-2


@pytest.mark.parametrize("dtype", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("kind,tokenizer", [("llama3_1", "tiktoken"), ("llama2", "sentencepiece"),
                                            ("qwen3_moe", "tiktoken")])
def test_quantized_logits_match_the_files_weights(export_checkpoint, tmp_path, open_llama, kind, tokenizer, dtype):
    """llama.cpp on a quantized file == tunelab running that file's dequantized weights, within
    the 8-bit activation rounding llama.cpp adds: llama.cpp reads the quantized blocks, names
    and types as the gguf package does (greedy agreement alone cannot show it: see below). The
    row order itself is checked by the f16 test. Qwen3-MoE: experts 256 wide, so the stacked
    ffn_*_exps hold real K-quants too; its router's top-k picks are discontinuous, and the
    activation rounding flips a near-tied pick at a few tokens (which then differ by a good
    part of the logit scale), so there the bound must hold at >= 90% of the 80 tokens (a
    misread tensor is off everywhere)."""
    moe = dict(moe_intermediate_size=256) if kind == "qwen3_moe" else {}
    ckpt = export_checkpoint(kind, tokenizer, **WIDE, **LLAMA_CPP_LAYOUT.get(kind, {}), **moe)
    path = export_gguf(ckpt, tmp_path / "m.gguf", dtype=dtype)
    ids = _prompt(load_tokenizer(ckpt), 80)
    ref = _tunelab_logits(_dequantized_model(ckpt, path), ids)
    got = _llama_logits(open_llama(path, logits_all=True), ids)
    scale, per_token = float(np.abs(ref).max()), np.abs(got - ref).max(axis=-1)
    within = float((per_token <= QUANT_REL_TOL * scale).mean())
    print(f"\n[llama.cpp {dtype} {kind}/{tokenizer}] max |logit diff| vs its own weights {per_token.max():.2e} "
          f"(max |logit| {scale:.2f}; tokens within the bound {within:.0%})")
    assert within >= (0.9 if kind == "qwen3_moe" else 1.0), (per_token.max(), scale, within)


@pytest.mark.parametrize("dtype,floor", [("q8_0", 0.85), ("q4_k_m", 0.6)])
@pytest.mark.parametrize("kind,tokenizer", [("llama3", "tiktoken"), ("llama2", "sentencepiece")])
def test_quantized_greedy_agreement(export_checkpoint, tmp_path, open_llama, kind, tokenizer, dtype, floor):
    """Greedy decoding of the quantized file in llama.cpp vs tunelab's fp32 ``generate``.

    Rates over 4 prompts x 24 tokens: teacher-forced (llama.cpp's argmax after each prefix of
    tunelab's greedy continuation equals tunelab's next token), the same restricted to positions
    whose fp32 top-1/top-2 logit margin is at least 0.05 (not near-ties), and free-running
    (tokens equal up to the first divergence). Tiny random models have near-tied logits, so
    quantization noise flips some argmaxes and one flip ends the free-running match; the asserted
    floor is on the teacher-forced rate. These rates barely move for a broken exporter (attention
    contributes little to a random 2-layer model's argmax: without the q/k reordering they stay
    within a few points), so correctness is asserted on logits above and here the rates are
    reported.
    """
    ckpt = export_checkpoint(kind, tokenizer, **WIDE)
    path = export_gguf(ckpt, tmp_path / "m.gguf", dtype=dtype)
    tok = load_tokenizer(ckpt)
    model = from_pretrained(ckpt)
    llm = open_llama(path, logits_all=True)
    n_new = 24
    hits, clear_hits, n_clear, free_hits, total, max_diff = 0, 0, 0, 0, 0, 0.0
    for seed in range(4):
        prompt = _prompt(tok, 12, seed=seed)
        ours = generate(model, prompt, max_new_tokens=n_new, temperature=0.0)
        seq = prompt + ours[:-1]
        ref = _tunelab_logits(model, seq)[len(prompt) - 1 :]  # row i predicts ours[i]
        got = _llama_logits(llm, seq)[len(prompt) - 1 :]
        assert (ref.argmax(-1) == np.array(ours)).all()  # generate is greedy on these logits
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
        agree = got.argmax(-1) == np.array(ours)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) >= 0.05
        hits += int(agree.sum())
        clear_hits += int(agree[clear].sum())
        n_clear += int(clear.sum())
        theirs = _greedy_llama(llm, prompt, n_new)
        free_hits += next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n_new)
        total += n_new
    forced, free = hits / total, free_hits / total
    clear_rate = clear_hits / max(n_clear, 1)
    print(f"\n[llama.cpp {dtype} {kind}/{tokenizer}] greedy agreement over {total} tokens: teacher-forced {forced:.3f}; "
          f"where the fp32 margin >= 0.05 ({n_clear} tokens) {clear_rate:.3f}; free-running until the "
          f"first divergence {free:.3f}; max |logit diff| {max_diff:.3f}")
    assert forced >= floor, forced
