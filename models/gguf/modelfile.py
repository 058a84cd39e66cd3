"""Ollama ``Modelfile`` next to an exported GGUF: ``ollama create NAME -f model.Modelfile``.

The TEMPLATE is Ollama's Go-template rendering of the model's chat format (the same text
tunelab trains on, see ``tunelab.data.tokenizers.messages``); llama.cpp's runner adds BOS
itself, so the templates do not start with one. ``PARAMETER stop`` lists the tokens that end
a reply (the tokenizer's stop tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["modelfile_text", "write_modelfile", "OLLAMA_TEMPLATES"]

# Ollama hands the template the system prompt as .System (the Modelfile's SYSTEM or the
# request's system messages) and may list system messages in .Messages too; they are skipped
# there so the prompt holds the system text once.
# Llama 3 header format.
_LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n{{- end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}'
    "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
    "{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Llama 2 [INST] format: the system prompt folds into the first user block; every turn after
# an answer starts with a fresh BOS, as in Meta's chat_completion.
_LLAMA2 = (
    "{{- $system := .System }}{{- range .Messages }}"
    '{{- if eq .Role "user" }}[INST] {{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n'
    '{{ end }}{{- $system = "" }}{{ .Content }} [/INST]'
    '{{- else if eq .Role "assistant" }} {{ .Content }} </s><s>'
    "{{- end }}{{- end }}"
)
OLLAMA_TEMPLATES = {"llama3": _LLAMA3, "llama2": _LLAMA2}


def modelfile_text(gguf_file: str, chat_format: str | None, stop_texts: list[str]) -> str:
    """The Modelfile for ``gguf_file`` (a path relative to the Modelfile's folder).

    Args:
        gguf_file: e.g. ``"./model.gguf"``.
        chat_format: ``"llama3"``, ``"llama2"`` or None (no TEMPLATE: plain completion).
        stop_texts: token texts that end generation.
    """
    lines = [f"FROM {gguf_file}"]
    template = OLLAMA_TEMPLATES.get(chat_format or "")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    for text in dict.fromkeys(stop_texts):
        lines.append(f"PARAMETER stop {json.dumps(text)}")
    return "\n".join(lines) + "\n"


def write_modelfile(path, gguf_path, vocab) -> Path:
    """Write the Modelfile for an exported file.

    Args:
        path: where to write it (normally ``<gguf stem>.Modelfile`` in the same folder).
        gguf_path: the exported .gguf file.
        vocab: the ``GGUFVocab`` written into it (chat format and stop tokens).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    gguf_path = Path(gguf_path)
    ref = f"./{gguf_path.name}" if gguf_path.parent.resolve() == path.parent.resolve() else str(gguf_path.resolve())
    path.write_text(modelfile_text(ref, vocab.chat_format, vocab.stop_texts), encoding="utf-8")
    return path
