"""Llama family: ``ModelArgs`` and the published sizes."""

from tunelab.models.llama.args import ModelArgs
from tunelab.models.llama.builders import (
    build_model,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama3_1_8b,
    llama3_1_70b,
    llama3_1_405b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_8b,
    llama3_70b,
    tiny,
)

__all__ = [
    "ModelArgs",
    "build_model",
    "llama2_7b",
    "llama2_13b",
    "llama2_70b",
    "llama3_8b",
    "llama3_70b",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_1_405b",
    "llama3_2_1b",
    "llama3_2_3b",
    "tiny",
]
