"""How close llama.cpp runs tunelab's GGUF exports: logits, greedy agreement, size, export time.

For each tokenizer kind x export dtype (f16, bf16, q8_0, q4_k_m), a tiny random Llama wide
enough for k-quants (rows of 256) is written by transformers (``save_pretrained``, the real HF
layout), exported with ``tunelab.training.export.export_gguf`` and run in llama.cpp
(llama-cpp-python). Kinds:

* ``sentencepiece``: Llama-2 style (multi-head attention, rope theta 1e4) with a Llama-2-style
  BPE sentencepiece model trained here on the tiny training text.
* ``tiktoken``: Llama-3.1 style (grouped-query attention, rope theta 5e5 with llama3 rope
  scaling, original context 64, so the 96-token prompt crosses it) with tunelab's tiny
  tiktoken file.

One JSON line per (kind, dtype):

* ``max_abs_logit_diff``: llama.cpp's logits on a prompt vs tunelab's, largest |difference|
  over all positions and vocabulary entries. The reference (``logit_reference``) is tunelab in
  fp32 on the checkpoint for f16 / bf16, and for q8_0 / q4_k_m tunelab running the file's own
  dequantized weights (what llama.cpp should compute from those bytes; the rest is llama.cpp
  rounding activations to 8 bits). ``max_abs_logit_diff_vs_fp32`` is always against the fp32
  checkpoint (the whole export error). ``max_abs_logit`` is the scale to read them against
  (``max_abs_logit_diff_rel`` = diff / scale).
* ``greedy_agreement``: teacher-forced, over ``agreement_tokens`` tokens: tunelab's fp32
  greedy continuation of each prompt is fed to llama.cpp, and at each position llama.cpp's
  argmax must equal tunelab's next token. ``greedy_agreement_clear`` counts only positions
  whose fp32 top-2 margin is >= 0.05 (random tiny models have many near-ties, where any
  rounding flips the argmax).
* ``export_s`` (wall time of ``export_gguf``), ``file_bytes``, ``bits_per_weight`` (8 x tensor
  bytes / weights, over all tensors including the F32 norms), ``tensor_types`` (count per ggml
  type). ``tokens_per_s`` and ``peak_gib`` are null: this is not a training workload.

    python bench/gguf_agreement.py --out bench/results/gguf_cpu.jsonl
    python bench/gguf_agreement.py --kinds tiktoken --dtypes q8_0 --agreement-tokens 8   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tunelab.data.tokenizers import load_tokenizer
from tunelab.models import from_pretrained
from tunelab.models.gguf import gguf_tensor_name
from tunelab.training.export import export_gguf
from tunelab.modules.generation import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py (see its docstring)
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"
KINDS = ("sentencepiece", "tiktoken")
DTYPES = ("f16", "bf16", "q8_0", "q4_k_m")
WORDS = ("add the numbers reverse word apple river stone window sort largest count letters "
         "how many planet hammer what is of and").split()


# ---------------------------------------------------------------------------- checkpoints
def train_sentencepiece(folder: Path) -> Path:
    """A Llama-2-like sentencepiece BPE model (byte fallback, <unk> <s> </s> = 0 1 2, digits
    split, text kept as is) trained on the tiny instruction data; returns the .model file."""
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    with open(TINY / "train.jsonl", encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
        for line in src:
            dst.write(" ".join(str(v) for v in json.loads(line).values() if v) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return folder / "sp.model"


def model_shape(kind: str, dim: int, hidden_dim: int, n_layers: int) -> dict:
    """HF config fields of the benchmark model of ``kind``."""
    shape = dict(vocab_size=1024, hidden_size=dim, intermediate_size=hidden_dim, num_hidden_layers=n_layers,
                 num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    if kind == "sentencepiece":  # Llama 2: every head has its own k/v, plain rope
        shape.update(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:  # Llama 3.1: GQA, rope scaled past 64 positions (kept small so the prompt crosses it)
        shape.update(num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return shape


def write_checkpoint(kind: str, folder: Path, tokenizer_file: Path, shape: dict, seed: int) -> Path:
    """Random LlamaForCausalLM saved by transformers, plus the tokenizer as tokenizer.model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = folder / f"ckpt_{kind}"
    out.mkdir()
    shutil.copyfile(tokenizer_file, out / "tokenizer.model")
    tok = load_tokenizer(out)
    config = LlamaConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1; move them so each one matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


# ---------------------------------------------------------------------------- references
def tunelab_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()  # [n, vocab]


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # [n, vocab]


def model_on_file_weights(ckpt: Path, gguf_path: Path):
    """tunelab's model carrying the GGUF file's dequantized weights. The exporter stores q/k
    rows interleaved per head (llama.cpp's rope pairs); they are put back in the HF half-split
    order tunelab's rope uses."""
    import gguf

    model = from_pretrained(ckpt)
    args = model.args
    native = {gguf_tensor_name(name): name for name in model.state_dict()}
    heads = {"attn_q.weight": args.n_heads, "attn_k.weight": args.n_kv_heads}
    state = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        if t.name == "rope_freqs.weight":  # llama.cpp's form of the rope scaling, not a weight
            continue
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        n = heads.get(t.name.split(".", 2)[-1])
        if n is not None:
            rows = w.shape[0]
            # [heads, half, 2, in] (pairs) -> [heads, 2, half, in] (halves)
            w = w.reshape(n, rows // n // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
        state[native[t.name]] = w
    model.load_state_dict(state, strict=True)
    return model


def prompt_ids(tok, n_tokens: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = tok.encode(" ".join(rng.choice(WORDS, size=n_tokens)), add_bos=True)
    return ids[:n_tokens]


def file_stats(path: Path) -> tuple[float, dict[str, int]]:
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    n_bytes = sum(int(t.n_bytes) for t in tensors)
    n_weights = sum(int(t.n_elements) for t in tensors)
    return 8 * n_bytes / n_weights, dict(Counter(t.tensor_type.name for t in tensors))


# ---------------------------------------------------------------------------- one measurement
def measure(kind: str, dtype: str, ckpt: Path, work: Path, args) -> dict:
    import llama_cpp

    tok = load_tokenizer(ckpt)
    model = from_pretrained(ckpt)  # fp32
    path = work / f"{kind}_{dtype}.gguf"
    start = time.perf_counter()
    export_gguf(ckpt, path, dtype=dtype, overwrite=True, modelfile=False)
    export_s = time.perf_counter() - start
    bpw, types = file_stats(path)

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=args.threads, n_batch=256,
                          logits_all=True, verbose=False)
    try:
        ids = prompt_ids(tok, args.logit_tokens, seed=1000)
        got = llama_logits(llm, ids)
        fp32 = tunelab_logits(model, ids)
        if dtype in ("f16", "bf16"):
            reference, ref = "tunelab_fp32", fp32
        else:
            reference, ref = "tunelab_on_file_weights", tunelab_logits(model_on_file_weights(ckpt, path), ids)

        hits = clear_hits = n_clear = total = 0
        for seed in range(args.prompts):
            prompt = prompt_ids(tok, 12, seed=seed)
            ours = generate(model, prompt, max_new_tokens=args.agreement_tokens, temperature=0.0)
            seq = prompt + ours[:-1]
            # row i (from the prompt's last position on) predicts ours[i]
            ref_rows = tunelab_logits(model, seq)[len(prompt) - 1:]
            cpp_rows = llama_logits(llm, seq)[len(prompt) - 1:]
            agree = cpp_rows.argmax(-1) == np.array(ours)
            top2 = np.sort(ref_rows, axis=-1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) >= 0.05
            hits += int(agree.sum())
            clear_hits += int(agree[clear].sum())
            n_clear += int(clear.sum())
            total += len(ours)
    finally:
        llm.close()

    a = model.args
    return {
        "device": "cpu",
        "profile": "gguf_agreement",
        "config": {
            "kind": kind, "dtype": dtype,
            "model": {"dim": a.dim, "hidden_dim": a.hidden_dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
                      "n_kv_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
                      "rope_scaling": a.rope_scaling is not None, "params": sum(p.numel() for p in model.parameters())},
            "logit_prompt_tokens": len(ids), "agreement_prompts": args.prompts,
            "agreement_tokens_per_prompt": args.agreement_tokens, "llama_cpp_threads": args.threads,
            "seed": args.seed, "llama_cpp": llama_cpp.__version__,
        },
        "max_abs_logit_diff": round(float(np.abs(got - ref).max()), 5),
        "logit_reference": reference,
        "max_abs_logit_diff_vs_fp32": round(float(np.abs(got - fp32).max()), 5),
        "max_abs_logit": round(float(np.abs(ref).max()), 4),
        "max_abs_logit_diff_rel": round(float(np.abs(got - ref).max() / np.abs(ref).max()), 5),
        "greedy_agreement": round(hits / total, 4),
        "agreement_tokens": total,
        "greedy_agreement_clear": round(clear_hits / max(n_clear, 1), 4),
        "clear_tokens": n_clear,
        "export_s": round(export_s, 3),
        "file_bytes": path.stat().st_size,
        "bits_per_weight": round(bpw, 3),
        "tensor_types": types,
        "tokens_per_s": None,
        "peak_gib": None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--dim", type=int, default=256, help="hidden size (a multiple of 256 for k-quants)")
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--logit-tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--agreement-tokens", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="llama.cpp threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the lines here (default: $BENCH_OUT)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory(prefix="gguf_agreement_") as tmp:
        work = Path(tmp)
        tokenizers = {"tiktoken": TINY / "tokenizer.model"}
        if "sentencepiece" in args.kinds:
            (work / "sp").mkdir()
            tokenizers["sentencepiece"] = train_sentencepiece(work / "sp")
        for i, kind in enumerate(args.kinds):
            shape = model_shape(kind, args.dim, args.hidden_dim, args.layers)
            ckpt = write_checkpoint(kind, work, tokenizers[kind], shape, args.seed)
            if i == 0:  # one untimed export first: export_s should not include one-time imports
                export_gguf(ckpt, work / "warmup.gguf", dtype="f16", modelfile=False)
            for dtype in args.dtypes:
                emit(measure(kind, dtype, ckpt, work, args), args.out)


if __name__ == "__main__":
    main()
