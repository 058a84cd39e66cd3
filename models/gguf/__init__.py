"""GGUF export for llama.cpp and Ollama (needs the optional ``gguf`` extra).

    from tunelab.models.gguf import export_gguf
    export_gguf("out/step_100/merged", "model.gguf", dtype="q4_k_m")
    export_gguf("base/", "model.gguf", dtype="f16", adapter_dir="out/step_100/adapter")

``export.py`` streams the checkpoint into a GGUF file, ``vocab.py`` lays out the tokenizer,
``quants.py`` holds the block quantizers and llama.cpp's Q4_K_M mix, ``modelfile.py`` writes
the Ollama Modelfile. Importing this package does not import ``gguf``; using the exporter
without it raises a ConfigError that names the extra to install.
"""

from tunelab.models.gguf.export import DTYPES, export_gguf, gguf_tensor_name, permute_for_llama_cpp, rope_freq_factors
from tunelab.models.gguf.modelfile import modelfile_text, write_modelfile

__all__ = [
    "DTYPES",
    "export_gguf",
    "gguf_tensor_name",
    "modelfile_text",
    "permute_for_llama_cpp",
    "rope_freq_factors",
    "write_modelfile",
]
