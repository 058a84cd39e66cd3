"""GGUF files for llama.cpp and Ollama: the weights side (needs the optional ``gguf`` extra).

The whole export, weights and tokenizer, is ``tunelab.training.export.export_gguf``::

    from tunelab.training.export import export_gguf
    export_gguf("out/step_100/merged", "model.gguf", dtype="q4_k_m")
    export_gguf("base/", "model.gguf", dtype="f16", adapter_dir="out/step_100/adapter")

``export.py`` streams the checkpoint into a GGUF file (:func:`write_gguf`, given the
vocabulary, which ``tunelab.data.tokenizers.gguf_vocab`` lays out from the tokenizer),
``quants.py`` holds the block quantizers and llama.cpp's Q4_K_M mix, ``modelfile.py`` writes
the Ollama Modelfile. Importing this package does not import ``gguf``; using the exporter
without it raises a ConfigError that names the extra to install.
"""

from tunelab.models.gguf.export import DTYPES, gguf_tensor_name, permute_for_llama_cpp, rope_freq_factors, write_gguf
from tunelab.models.gguf.modelfile import modelfile_text, write_modelfile

__all__ = [
    "DTYPES",
    "gguf_tensor_name",
    "modelfile_text",
    "permute_for_llama_cpp",
    "rope_freq_factors",
    "write_gguf",
    "write_modelfile",
]
