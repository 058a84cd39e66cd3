"""GGUF export read back with the ``gguf`` package's reader (the format oracle).

Checked: llama metadata, tensor names/shapes/types, every tensor dequantized against the
source weights within its type's rounding bound, q/k row order, Llama 3.1 ``rope_freqs``, the
tokenizer (tokens + merges reproduce tunelab's ids; sentencepiece pieces/scores/types), the chat
template, adapter merging, QLoRA (bitsandbytes nf4) bases, the Modelfile and the CLI errors.
llama.cpp itself runs the files in test_llama_cpp.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

if os.environ.get("CI"):  # CI installs .[dev]: a missing gguf there is a failure, not a skip
    import gguf
else:
    gguf = pytest.importorskip("gguf")

from tunelab.data.tokenizers import LLAMA3_SPLIT_PATTERN, Message, load_tokenizer  # noqa: E402
from tunelab.data.tokenizers.hf_json import bytes_to_unicode  # noqa: E402
from tunelab.errors import CheckpointError, ConfigError  # noqa: E402
from tunelab.models import from_pretrained, save_pretrained  # noqa: E402
from tunelab.training.export import export_gguf  # noqa: E402
from tunelab.models.gguf.export import permute_for_llama_cpp  # noqa: E402

T = gguf.GGMLQuantizationType
WIDE = dict(hidden_size=256, intermediate_size=512)  # rows of 256: K-quant blocks fit


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _source_weights(ckpt) -> dict[str, np.ndarray]:
    """GGUF name -> the fp32 source tensor in the layout llama.cpp expects (q/k permuted)."""
    model = from_pretrained(ckpt)
    a = model.args
    out = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    if not a.tie_word_embeddings:
        out["output.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        out[f"blk.{i}.attn_norm.weight"] = layer.attn_norm.weight
        out[f"blk.{i}.attn_q.weight"] = permute_for_llama_cpp(layer.attn.q_proj.weight, a.n_heads)
        out[f"blk.{i}.attn_k.weight"] = permute_for_llama_cpp(layer.attn.k_proj.weight, a.n_kv_heads)
        out[f"blk.{i}.attn_v.weight"] = layer.attn.v_proj.weight
        out[f"blk.{i}.attn_output.weight"] = layer.attn.o_proj.weight
        out[f"blk.{i}.ffn_norm.weight"] = layer.mlp_norm.weight
        out[f"blk.{i}.ffn_gate.weight"] = layer.mlp.gate_proj.weight
        out[f"blk.{i}.ffn_up.weight"] = layer.mlp.up_proj.weight
        out[f"blk.{i}.ffn_down.weight"] = layer.mlp.down_proj.weight
    return {k: v.detach().float().numpy() for k, v in out.items()}


# Relative RMSE bound per block type (error RMS / weight RMS over a whole tensor) for the
# Gaussian weights of the tiny models. A b-bit code over a block's range of a few sigma has an
# RMS error of about step / sqrt(12): measured ~0.071 for Q4_K and ~0.018 for Q6_K on these
# tensors; the bounds leave ~1.5x room (Q5_x, used only as fallbacks, sit in between).
_REL_RMSE = {T.Q4_K: 0.1, T.Q5_0: 0.05, T.Q5_1: 0.05, T.Q5_K: 0.05, T.Q6_K: 0.03}


def _check_close(name: str, qtype, got: np.ndarray, want: np.ndarray) -> None:
    """Compare a dequantized tensor with its source within the type's rounding bound."""
    if qtype == T.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == T.F16:  # round to nearest: half an ulp, 2**-11 relative (+ subnormal floor)
        np.testing.assert_allclose(got, want, rtol=2.0**-11, atol=6e-8, err_msg=name)
    elif qtype == T.BF16:  # 8 significant bits: half an ulp is 2**-8 relative
        np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=0, err_msg=name)
    elif qtype == T.Q8_0:
        # per 32-block scale d = amax / 127 (stored as f16): error <= d/2 from the rounding
        # plus 127 * d * 2**-11 from the f16 scale, < 0.6 d
        blocks_w = want.reshape(-1, 32)
        bound = 0.6 * np.abs(blocks_w).max(axis=1, keepdims=True) / 127
        assert (np.abs(got.reshape(-1, 32) - blocks_w) <= bound + 1e-12).all(), name
    else:
        rel = float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))
        assert rel < _REL_RMSE[qtype], (name, qtype.name, rel)


# ------------------------------------------------------------------ metadata, shapes, values
@pytest.mark.parametrize(
    "kind,tokenizer", [("llama2", "sentencepiece"), ("llama3", "tiktoken"), ("llama3_2", "tiktoken")]
)
def test_metadata_shapes_and_f16_values(export_checkpoint, tmp_path, kind, tokenizer):
    """Metadata equals config.json; every tensor has llama.cpp's name and ggml shape (reversed
    numpy order) and dequantizes to the source within f16 rounding; tied models carry no
    output.weight."""
    ckpt = export_checkpoint(kind, tokenizer)
    cfg = json.loads((ckpt / "config.json").read_text())
    out = export_gguf(ckpt, tmp_path / "m.gguf", dtype="f16")
    reader = gguf.GGUFReader(out)
    f = _fields(reader)
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expect = {
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.vocab_size": cfg["vocab_size"],
        "llama.rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
    }
    for key, value in expect.items():
        assert f[key] == value, key
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"]  # padded to the embedding rows

    source = _source_weights(ckpt)
    tensors = _tensors(reader)
    assert set(tensors) == set(source)  # no rope_freqs without rope scaling, no tied output
    for name, t in tensors.items():
        want = source[name]
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml ne[0] = columns
        assert t.tensor_type == (T.F32 if want.ndim == 1 else T.F16), name
        _check_close(name, t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type), want)


@pytest.mark.parametrize("dtype,file_type", [("bf16", "MOSTLY_BF16"), ("q8_0", "MOSTLY_Q8_0"),
                                             ("q4_k_m", "MOSTLY_Q4_K_M")])
@pytest.mark.parametrize("tokenizer", ["tiktoken", "sentencepiece"])
def test_quantized_types_dequantize_within_tolerance(export_checkpoint, tmp_path, dtype, file_type, tokenizer):
    """bf16 / q8_0 / q4_k_m on a model with rows of 256: each tensor is stored as the type the
    dtype calls for (q4_k_m really holds Q4_K and Q6_K tensors) and reads back within that
    type's bound (see _check_close)."""
    ckpt = export_checkpoint("llama3", tokenizer, **WIDE)
    out = export_gguf(ckpt, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(out)
    assert _fields(reader)["general.file_type"] == getattr(gguf.LlamaFileType, file_type)
    source = _source_weights(ckpt)
    types = set()
    for t in reader.tensors:
        want = source[t.name]
        types.add(t.tensor_type)
        if want.ndim == 1:
            assert t.tensor_type == T.F32
        _check_close(t.name, t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type), want)
    expected = {"bf16": {T.BF16, T.F32}, "q8_0": {T.Q8_0, T.F32}, "q4_k_m": {T.Q4_K, T.Q6_K, T.F32}}[dtype]
    assert types == expected


def test_q_k_rows_are_in_llama_cpp_rope_order():
    """Within a head, row 2i is HF row i and row 2i+1 is HF row i + head_dim/2."""
    n_heads, head_dim, cols = 3, 8, 5
    w = torch.randn(n_heads * head_dim, cols)
    p = permute_for_llama_cpp(w, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            assert torch.equal(p[h * head_dim + 2 * i], w[h * head_dim + i])
            assert torch.equal(p[h * head_dim + 2 * i + 1], w[h * head_dim + i + head_dim // 2])


def test_llama3_1_rope_freqs_tensor(export_checkpoint, tmp_path):
    """Llama 3.1 scaling goes in rope_freqs.weight [head_dim/2] F32: llama.cpp's divisor per
    frequency (1 above the high-frequency cutoff, `factor` below the low one, blended between),
    recomputed here from the rule itself; 1e-6 relative covers the float32 ratio."""
    ckpt = export_checkpoint("llama3_1")
    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg["rope_parameters"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    out = export_gguf(ckpt, tmp_path / "m.gguf")
    t = _tensors(gguf.GGUFReader(out))["rope_freqs.weight"]
    assert t.tensor_type == T.F32 and list(t.shape) == [head_dim // 2]
    old, lo, hi, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                           rope["high_freq_factor"], rope["factor"])
    want = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < old / hi:
            want.append(1.0)
        elif wavelen > old / lo:
            want.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            want.append(1 / ((1 - smooth) / factor + smooth))
    np.testing.assert_allclose(np.asarray(t.data), want, rtol=1e-6)
    assert 1.0 in want and factor in want and any(1 < w < factor for w in want)  # all 3 regimes


# ------------------------------------------------------------------ tokenizer
def _bpe_from_gguf(fields: dict):
    """A byte-level BPE encoder built only from the GGUF tokens + merges, applying merges by
    their position in the list (llama.cpp's rule) after Llama 3's pre-tokenizer split."""
    import regex

    tokens = fields["tokenizer.ggml.tokens"]
    token_id = {t: i for i, t in enumerate(tokens)}
    rank = {tuple(m.split(" ")): r for r, m in enumerate(fields["tokenizer.ggml.merges"])}
    to_unicode = bytes_to_unicode()
    split = regex.compile(LLAMA3_SPLIT_PATTERN)

    def encode(text: str) -> list[int]:
        ids = []
        for piece in split.findall(text):
            syms = [to_unicode[b] for b in piece.encode("utf-8")]
            while len(syms) > 1:
                r, i = min((rank.get((syms[j], syms[j + 1]), math.inf), j) for j in range(len(syms) - 1))
                if r == math.inf:
                    break
                syms[i : i + 2] = [syms[i] + syms[i + 1]]
            ids += [token_id[s] for s in syms]
        return ids

    return encode


def test_tiktoken_vocab_and_merges_reproduce_tunelab(export_checkpoint, tmp_path, random_text):
    """gpt2 model + llama-bpe pre-tokenizer; a BPE that knows only the GGUF tokens and merges
    gives tunelab's ids on random text; special tokens are CONTROL with their ids named."""
    ckpt = export_checkpoint("llama3")
    tok = load_tokenizer(ckpt)
    f = _fields(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf")))
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    encode = _bpe_from_gguf(f)
    for seed in range(20):
        text = random_text(seed)
        assert encode(text) == tok.encode(text, add_bos=False), text
    types = f["tokenizer.ggml.token_type"]
    for name in ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|reserved_special_token_9|>"):
        i = tok.special_id(name)
        assert f["tokenizer.ggml.tokens"][i] == name and types[i] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert f["tokenizer.ggml.eot_token_id"] == tok.special_id("<|eot_id|>")
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert f["tokenizer.ggml.add_bos_token"] is True
    pads = range(tok.vocab_size, len(types))  # embedding rows past the tokenizer
    assert len(pads) > 0 and all(types[i] == gguf.TokenType.UNUSED for i in pads)


def test_sentencepiece_vocab_is_the_model(export_checkpoint, tmp_path):
    """llama model: every piece, score and type as sentencepiece has it; unk/bos/eos ids."""
    import sentencepiece as spm

    ckpt = export_checkpoint("llama2", "sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    f = _fields(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf")))
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    n = sp.get_piece_size()
    assert f["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    np.testing.assert_array_equal(f["tokenizer.ggml.scores"][:n], [sp.get_score(i) for i in range(n)])
    TT = gguf.TokenType
    want = [TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else TT.BYTE if sp.is_byte(i)
            else TT.NORMAL for i in range(n)]
    assert f["tokenizer.ggml.token_type"][:n] == want
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.bos_token_id"],
            f["tokenizer.ggml.eos_token_id"]) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.ggml.remove_extra_whitespaces"] is False


@pytest.mark.parametrize("tokenizer", ["tiktoken", "sentencepiece"])
def test_chat_template_renders_tunelab_chat_format(export_checkpoint, tmp_path, tokenizer):
    """Without a tokenizer_config.json the GGUF gets tunelab's own chat template: rendered with
    Jinja it is exactly the text of tunelab's tokenize_messages (both formats, multi-turn)."""
    import jinja2

    ckpt = export_checkpoint("llama3" if tokenizer == "tiktoken" else "llama2", tokenizer)
    tok = load_tokenizer(ckpt)
    f = _fields(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf")))
    msgs = [Message("system", "Be brief."), Message("user", "Add 2 and 3."), Message("assistant", "5"),
            Message("user", " Reverse 'stone'. ")]
    ids, _ = tok.tokenize_messages(msgs, add_generation_prompt=True)
    bos = f["tokenizer.ggml.tokens"][tok.bos_id]
    eos = f["tokenizer.ggml.tokens"][tok.eos_id]
    rendered = jinja2.Environment().from_string(f["tokenizer.chat_template"]).render(
        messages=[{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt=True,
        bos_token=bos, eos_token=eos,
    )
    assert rendered == tok.decode(ids, skip_special_tokens=False)


def test_chat_template_from_tokenizer_config_wins(export_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(export_checkpoint("llama3"), ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    f = _fields(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf")))
    assert f["tokenizer.chat_template"] == "{{ messages }}"


# ------------------------------------------------------------------ adapters and QLoRA bases
def _make_adapter(ckpt, out_dir, seed=0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
                  dora=False):
    """A tunelab LoRA (or DoRA) adapter with random (non-zero) A and B (and magnitudes off the
    row norms), plus its merged HF folder."""
    from tunelab.models.adapters import save_adapter
    from tunelab.modules.peft import apply_lora, merge_lora_state_dict

    model = from_pretrained(ckpt)
    apply_lora(model, list(targets), rank=4, alpha=8.0, use_dora=dora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_magnitude"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, out_dir / "adapter", base_model_name_or_path=str(ckpt))
    save_pretrained(merge_lora_state_dict(model), out_dir / "merged", source_dir=ckpt, args=model.args)
    return out_dir / "adapter", out_dir / "merged"


@pytest.mark.parametrize("dtype,dora", [("f16", False), ("q8_0", False), ("f16", True)])
def test_adapter_merge_equals_merged_folder(export_checkpoint, tmp_path, dtype, dora):
    """base + --adapter exports the same bytes as the merged folder tunelab writes (both merge
    W0 + (alpha/r) B A in fp32 once, DoRA rows rescaled to their magnitudes, then encode); and
    the adapter really changed the weights."""
    ckpt = export_checkpoint("llama3", **WIDE)
    adapter, merged = _make_adapter(ckpt, tmp_path, dora=dora)
    a = _tensors(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "a.gguf", dtype=dtype, adapter_dir=adapter)))
    b = _tensors(gguf.GGUFReader(export_gguf(merged, tmp_path / "b.gguf", dtype=dtype)))
    base = _tensors(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "c.gguf", dtype=dtype)))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)
    assert not np.array_equal(np.asarray(a["blk.0.attn_q.weight"].data), np.asarray(base["blk.0.attn_q.weight"].data))
    np.testing.assert_array_equal(np.asarray(a["blk.0.ffn_up.weight"].data), np.asarray(base["blk.0.ffn_up.weight"].data))


def test_adapter_for_another_model_is_refused(export_checkpoint, tmp_path):
    other = export_checkpoint("llama3", seed=1, hidden_size=96, num_attention_heads=4)
    adapter, _ = _make_adapter(other, tmp_path / "other")
    with pytest.raises(CheckpointError, match="shape"):
        export_gguf(export_checkpoint("llama3"), tmp_path / "m.gguf", adapter_dir=adapter)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_qlora_bitsandbytes_base_is_dequantized(export_checkpoint, tmp_path):
    """A transformers + bitsandbytes nf4 checkpoint (QLoRA base) exports its dequantized
    weights: equal, within f16 rounding, to tunelab's dense load of the same folder."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dense = export_checkpoint("llama3")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(dense, quantization_config=qcfg, dtype=torch.float32, device_map="cpu")
    folder = tmp_path / "bnb"
    hf.save_pretrained(folder)
    shutil.copyfile(dense / "tokenizer.model", folder / "tokenizer.model")
    tensors = _tensors(gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf")))
    source = _source_weights(folder)  # from_pretrained dequantizes a bnb checkpoint
    for name, t in tensors.items():
        _check_close(name, t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type), source[name])
    dense_q = _source_weights(dense)["blk.0.attn_q.weight"]
    assert not np.allclose(source["blk.0.attn_q.weight"], dense_q, atol=1e-4)  # really the nf4 values


# ------------------------------------------------------------------ Modelfile, CLI, errors
@pytest.mark.parametrize("tokenizer,template_bit,stops", [
    ("tiktoken", "<|start_header_id|>{{ .Role }}<|end_header_id|>", ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]),
    ("sentencepiece", "[INST] ", ["</s>"]),
])
def test_modelfile_next_to_the_gguf(export_checkpoint, tmp_path, tokenizer, template_bit, stops):
    ckpt = export_checkpoint("llama3" if tokenizer == "tiktoken" else "llama2", tokenizer)
    out = export_gguf(ckpt, tmp_path / "my-model.gguf")
    text = (tmp_path / "my-model.Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./my-model.gguf"
    assert 'TEMPLATE """' in text and template_bit in text
    assert [ln for ln in lines if ln.startswith("PARAMETER stop")] == [f'PARAMETER stop "{s}"' for s in stops]
    assert out == tmp_path / "my-model.gguf"


def _cli(*argv):
    from tunelab.cli.main import main

    return main(["export", "gguf", *map(str, argv)])


def test_cli_exports_and_refuses_to_overwrite(export_checkpoint, tmp_path, capsys):
    ckpt = export_checkpoint("llama3")
    out = tmp_path / "m.gguf"
    assert _cli("--checkpoint", ckpt, "--out", out, "--dtype", "q8_0") == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert str(out) in capsys.readouterr().out
    before = out.read_bytes()
    assert _cli("--checkpoint", ckpt, "--out", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and "Traceback" not in err
    assert out.read_bytes() == before  # the earlier export is untouched
    assert _cli("--checkpoint", ckpt, "--out", out, "--force") == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16


@pytest.mark.parametrize("case,words", [
    ("dtype", "q5_k"), ("checkpoint", "does not exist"), ("adapter", "adapter"), ("tokenizer", "tokenizer"),
    ("nan", "holds nan/inf values"),
])
def test_cli_errors_are_one_line(export_checkpoint, tmp_path, capsys, case, words):
    ckpt = export_checkpoint("llama3")
    capsys.readouterr()  # transformers' progress bar, when this test is the first to make it
    args = ["--checkpoint", ckpt, "--out", tmp_path / "m.gguf"]
    if case == "dtype":
        args += ["--dtype", "q5_k"]
    elif case == "checkpoint":
        args[1] = tmp_path / "nope"
    elif case == "adapter":
        args += ["--adapter", tmp_path]
    elif case == "nan":  # weights of a run that diverged
        from safetensors.torch import load_file, save_file

        poisoned = tmp_path / "poisoned"
        shutil.copytree(ckpt, poisoned)
        weights = load_file(poisoned / "model.safetensors")
        weights["model.norm.weight"][0] = float("nan")
        save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
        args[1] = poisoned
    else:
        bare = tmp_path / "bare"
        shutil.copytree(ckpt, bare)
        (bare / "tokenizer.model").unlink()
        args[1] = bare
    assert _cli(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "m.gguf").exists()


def test_missing_gguf_package_names_the_extra(export_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[gguf\]'"):
        export_gguf(export_checkpoint("llama3"), tmp_path / "m.gguf")


def test_export_streams_one_tensor_at_a_time(export_checkpoint, tmp_path, monkeypatch):
    """Peak memory ~ one tensor: every weight read from the checkpoint is freed before the
    next one is read (tracked with weak references to what the reader hands out)."""
    import weakref

    from tunelab.models.gguf import export as export_mod

    real_read = export_mod._Source.read
    handed_out: list = []
    most_alive = 0

    def read(self, native):
        nonlocal most_alive
        most_alive = max(most_alive, sum(ref() is not None for ref in handed_out))
        tensor = real_read(self, native)
        handed_out.append(weakref.ref(tensor))
        return tensor

    ckpt = export_checkpoint("llama3", **WIDE)
    adapter, _ = _make_adapter(ckpt, tmp_path)
    monkeypatch.setattr(export_mod._Source, "read", read)
    export_gguf(ckpt, tmp_path / "m.gguf", dtype="q8_0", adapter_dir=adapter)
    assert len(handed_out) == 1 + 9 * 2 + 2  # embedding, 9 per layer, final norm, output
    assert most_alive == 0


def test_sentencepiece_added_tokens_reach_the_gguf_vocabulary(export_checkpoint, tmp_path):
    """Phi-3's chat markers sit past its sentencepiece model's pieces (added_tokens.json): the
    GGUF vocabulary holds them at their ids as control tokens, so llama.cpp renders its chats."""
    import shutil

    from ..data.chat_templates import write_sentencepiece_tokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(export_checkpoint("llama2", "sentencepiece"), ckpt)
    write_sentencepiece_tokenizer(ckpt, "phi3_5")
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    text = lambda i: bytes(tokens.parts[tokens.data[i]]).decode()  # noqa: E731
    assert [text(i) for i in range(400, 405)] == ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    assert all(int(types.parts[types.data[i]][0]) == gguf.TokenType.CONTROL for i in range(400, 405))


def test_gpt_oss_from_the_hub_layout_with_an_adapter_equals_its_merged_folder(export_checkpoint, tmp_path):
    """gpt-oss as the Hub stores it (MXFP4 experts) + an adapter on attention and experts:
    base + --adapter exports the same bytes as the merged (bf16-dense) folder, interleaved
    gate/up experts and their biases split as llama.cpp's gpt-oss reads them (biases and sinks
    F32); q4_k_m is refused in one line."""
    ckpt = export_checkpoint("gpt_oss_mxfp4")
    adapter, merged = _make_adapter(ckpt, tmp_path, targets=("q_proj", "o_proj", "experts"))
    a = _tensors(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "a.gguf", adapter_dir=adapter)))
    b = _tensors(gguf.GGUFReader(export_gguf(merged, tmp_path / "b.gguf")))
    assert set(a) == set(b)
    assert {"blk.0.attn_sinks.weight", "blk.0.ffn_gate_exps.bias", "blk.1.post_attention_norm.weight"} <= set(a)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)
    assert a["blk.0.ffn_up_exps.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    with pytest.raises(CheckpointError, match="q4_k_m export of gpt-oss") as info:
        export_gguf(ckpt, tmp_path / "q.gguf", dtype="q4_k_m")
    assert "\n" not in str(info.value)


def test_moe_expert_adapter_merge_equals_merged_folder(export_checkpoint, tmp_path):
    """Qwen3-MoE with expert LoRA: base + --adapter exports the same bytes as the merged folder
    (the per-expert updates merged into the stacked experts, then split into ffn_gate_exps /
    ffn_up_exps); q4_k_m of an 8-expert model (whose llama.cpp mix is not followed) is refused
    in one line."""
    ckpt = export_checkpoint("qwen3_moe", mlp_only_layers=[])
    adapter, merged = _make_adapter(ckpt, tmp_path, targets=("q_proj", "experts"))
    a = _tensors(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "a.gguf", adapter_dir=adapter)))
    b = _tensors(gguf.GGUFReader(export_gguf(merged, tmp_path / "b.gguf")))
    base = _tensors(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "c.gguf")))
    assert set(a) == set(b) and "blk.1.ffn_up_exps.weight" in a
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].data), np.asarray(b[name].data), err_msg=name)
    assert not np.array_equal(np.asarray(a["blk.1.ffn_up_exps.weight"].data),
                              np.asarray(base["blk.1.ffn_up_exps.weight"].data))
    eight = export_checkpoint("qwen3_moe", mlp_only_layers=[], num_experts=8)
    with pytest.raises(CheckpointError, match="q4_k_m export of an 8-expert model") as info:
        export_gguf(eight, tmp_path / "q.gguf", dtype="q4_k_m")
    assert "\n" not in str(info.value)
