"""Models: Llama builders, HF config.json <-> ModelArgs, HF safetensors checkpoints."""

from tunelab.models.checkpoint import (
    from_pretrained,
    hf_to_native_key,
    load_hf_state_dict,
    native_to_hf_key,
    save_pretrained,
)
from tunelab.models.hf_config import args_from_hf_config, hf_config_from_args
from tunelab.models.llama import (
    ModelArgs,
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
    "args_from_hf_config",
    "build_model",
    "from_pretrained",
    "hf_config_from_args",
    "hf_to_native_key",
    "llama2_7b",
    "llama2_13b",
    "llama2_70b",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_1_405b",
    "llama3_2_1b",
    "llama3_2_3b",
    "llama3_8b",
    "llama3_70b",
    "load_hf_state_dict",
    "native_to_hf_key",
    "save_pretrained",
    "tiny",
]
