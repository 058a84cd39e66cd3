"""GGUF export: a checkpoint's weights (``tunelab.models.gguf``) and its tokenizer
(``tunelab.data.tokenizers.gguf_vocab``) in one file for llama.cpp and Ollama.

    from tunelab.training.export import export_gguf
    export_gguf("out/step_100/merged", "model.gguf", dtype="q4_k_m")
    export_gguf("base/", "model.gguf", dtype="f16", adapter_dir="out/step_100/adapter")

Used by ``tune export gguf`` and by the recipes' ``export_gguf`` step. It lives here, above
models and data, because it is where the two meet (models and data never import each other).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.run_layout import MERGED

__all__ = ["export_gguf", "export_gguf_step"]


def export_gguf(checkpoint_dir, out_path, *, dtype: str = "f16", adapter_dir=None, tokenizer_path=None,
                overwrite: bool = False, modelfile: bool = True) -> Path:
    """Write a checkpoint as one GGUF file for llama.cpp (and an Ollama Modelfile).

    Works on a merged folder (``step_N/merged``) or on a base folder plus its adapter
    (``adapter_dir=step_N/adapter``; merged tensor by tensor in fp32); a bitsandbytes nf4 base
    (QLoRA) is dequantized first. See ``tunelab.models.gguf.write_gguf`` for the file.

    Args:
        checkpoint_dir: HF Llama folder (config.json + safetensors).
        out_path: the ``.gguf`` file to write.
        dtype: ``f16`` | ``bf16`` | ``q8_0`` | ``q4_k_m`` (llama.cpp's Q4_K_M mix).
        adapter_dir: optional PEFT LoRA folder to merge into the weights.
        tokenizer_path: tokenizer file or folder (default: found in ``checkpoint_dir``).
        overwrite: replace an existing ``out_path`` (and Modelfile); otherwise refuse.
        modelfile: also write ``<out stem>.Modelfile`` next to the file (``ollama create``).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ConfigError: unknown dtype, output exists, the gguf package is missing.
        CheckpointError: bad checkpoint folder, tokenizer or adapter (e.g. an adapter for
            another base model).
    """
    from tunelab.data.tokenizers.gguf_vocab import build_vocab
    from tunelab.models.gguf import write_gguf

    tokenizer = tokenizer_path if tokenizer_path is not None else checkpoint_dir
    return write_gguf(checkpoint_dir, out_path, lambda vocab_size: build_vocab(tokenizer, vocab_size), dtype=dtype,
                      adapter_dir=adapter_dir, overwrite=overwrite, modelfile=modelfile)


def export_gguf_step(cfg, final_dir: Path) -> Path | None:
    """The recipes' ``export_gguf`` step after the final save: ``final_dir/model-<dtype>.gguf``
    and its Ollama Modelfile, from the merged folder when that save wrote one, else from the
    base checkpoint + the adapter (merged in fp32 while exporting). None when the key is null;
    an existing file (a finished run resumed) is kept.
    """
    if cfg.export_gguf is None:
        return None
    out = final_dir / f"model-{cfg.export_gguf.dtype}.gguf"
    if out.exists():
        print(f"notice: {out} exists; export_gguf kept it")
        return out
    merged = final_dir / MERGED
    source, adapter = (merged, None) if merged.is_dir() else (Path(cfg.checkpoint_dir), final_dir / "adapter")
    return export_gguf(source, out, dtype=cfg.export_gguf.dtype, adapter_dir=adapter, tokenizer_path=cfg.tokenizer)
