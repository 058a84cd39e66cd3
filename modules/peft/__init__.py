"""Parameter-efficient fine-tuning: LoRA layers and the helpers that put them into a model."""

from tunelab.modules.peft.lora import (
    LoRALinear,
    apply_lora,
    apply_lora_to_modules,
    check_lora_args,
    disable_adapters,
    get_adapter_params,
    linear_layer_names,
    lora_modules,
    merge_lora_,
    merge_lora_state_dict,
    register_lora_base,
    resolve_lora_targets,
    set_trainable_params,
)

__all__ = [
    "LoRALinear",
    "apply_lora",
    "apply_lora_to_modules",
    "check_lora_args",
    "disable_adapters",
    "get_adapter_params",
    "linear_layer_names",
    "lora_modules",
    "merge_lora_",
    "merge_lora_state_dict",
    "register_lora_base",
    "resolve_lora_targets",
    "set_trainable_params",
]
