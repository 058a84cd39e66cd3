"""The built-in recipes and the configs that belong to each (what `tune ls` prints).

A recipe is one self-contained script ``tunelab/recipes/<name>.py`` that runs as
``python <file> --config CFG [overrides]``. For ``tune validate`` it declares its settings
dataclass at module top level under the name in ``RecipeSpec.config_class`` (default
``RecipeConfig``) and keeps its work behind ``if __name__ == "__main__":``, so importing the
file builds nothing. Config names map to ``tunelab/configs/<name>.yaml``.

Recipes and configs listed here but not (yet) present on disk are skipped at runtime, so
`tune ls` never prints something that cannot run.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tunelab.errors import ConfigError

__all__ = [
    "RECIPES",
    "RecipeSpec",
    "available_recipes",
    "find_recipe_for_config",
    "load_recipe_module",
    "recipe_file",
    "recipe_schema",
    "recipes_dir",
]


def recipes_dir() -> Path:
    """Folder holding the built-in recipe scripts."""
    return Path(__file__).resolve().parent


@dataclass(frozen=True)
class RecipeSpec:
    """One built-in recipe.

    Args:
        name: public recipe name (``tune run <name>``).
        configs: built-in config names that run with this recipe.
        config_class: name of the settings dataclass at the recipe module's top level.
        distributed: launched through torchrun (``tune run --nproc_per_node N ...``).
    """

    name: str
    configs: tuple[str, ...]
    config_class: str = "RecipeConfig"
    distributed: bool = False

    @property
    def file(self) -> Path:
        """Path of the recipe script."""
        return recipes_dir() / f"{self.name}.py"

    def exists(self) -> bool:
        return self.file.is_file()

    def available_configs(self) -> list[str]:
        """Config names whose YAML file exists."""
        from tunelab.training.config import configs_dir

        root = configs_dir()
        return [c for c in self.configs if (root / f"{c}.yaml").is_file()]


RECIPES: dict[str, RecipeSpec] = {
    spec.name: spec
    for spec in [
        RecipeSpec(
            name="lora_finetune_single_device",
            configs=(
                "llama2/7B_lora_single_device",
                "llama2/7B_qlora_single_device",
                "llama3/8B_lora_single_device",
                "llama3_1/8B_lora_single_device",
                "llama3_1/8B_qlora_single_device",
                "llama3_1/8B_qlora_long_context",
                "llama3_1/70B_qlora_single_device",
                "llama3_2/1B_lora_single_device",
                "llama3_2/3B_lora_single_device",
                "llama3_2/3B_qlora_single_device",
                "gemma3/4B_lora_single_device",
                "gemma3/12B_qlora_single_device",
                "gemma3/27B_qlora_single_device",
                "mistral/7B_lora_single_device",
                "mistral/nemo_12B_qlora_single_device",
                "phi3/mini_lora_single_device",
                "phi4/14B_qlora_single_device",
                "qwen2_5/7B_lora_single_device",
                "gpt_oss/20B_lora_single_device",
                "gpt_oss/20B_qlora_single_device",
                "qwen3_moe/30B_A3B_lora_single_device",
                "qwen3_moe/30B_A3B_qlora_single_device",
                "qwen3/8B_lora_single_device",
                "qwen3/8B_qlora_single_device",
                "qwen3/32B_qlora_single_device",
                "tiny/lora",
                "tiny/qlora",
            ),
        ),
        RecipeSpec(
            name="lora_finetune_distributed",
            configs=(
                "llama3_1/8B_lora_distributed",
                "llama3_1/70B_lora_distributed",
                "llama3_1/70B_qlora_distributed",
                "gpt_oss/120B_qlora_distributed",
                "qwen3/8B_lora_distributed",
                "qwen3_moe/235B_A22B_qlora_distributed",
                "tiny/lora_distributed",
            ),
            distributed=True,
        ),
        RecipeSpec(
            name="full_finetune_single_device",
            configs=("llama3_1/8B_full_single_device", "qwen3/8B_full_single_device", "tiny/full"),
        ),
        RecipeSpec(
            name="full_finetune_distributed",
            configs=("llama3_1/8B_full_distributed", "tiny/full_distributed"),
            distributed=True,
        ),
        RecipeSpec(
            name="lora_grpo_single_device",
            configs=("llama3_1/8B_lora_grpo", "qwen3/8B_qlora_grpo", "tiny/grpo"),
        ),
        RecipeSpec(
            name="lora_grpo_distributed",
            configs=("tiny/grpo_distributed",),
            distributed=True,
        ),
        RecipeSpec(
            name="lora_dpo_single_device",
            configs=("llama3_1/8B_lora_dpo", "llama3_1/8B_qlora_dpo", "qwen3/8B_lora_dpo", "tiny/dpo"),
        ),
        RecipeSpec(
            name="lora_dpo_distributed",
            configs=("llama3_1/8B_lora_dpo_distributed", "tiny/dpo_distributed"),
            distributed=True,
        ),
        RecipeSpec(name="generate", configs=("generate",)),
    ]
}


def available_recipes() -> list[RecipeSpec]:
    """Registered recipes whose script exists, in registry order."""
    return [spec for spec in RECIPES.values() if spec.exists()]


def recipe_file(name_or_path: str | Path) -> Path:
    """Script of a recipe given by built-in name or as a path to a ``.py`` file.

    Raises:
        ConfigError: neither an existing ``.py`` file nor an available built-in recipe.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix == ".py" or "/" in text or path.is_file():
        if path.is_file():
            return path
        raise ConfigError(f"recipe file '{text}' not found")
    spec = RECIPES.get(text)
    if spec is not None and spec.exists():
        return spec.file
    import difflib

    names = [s.name for s in available_recipes()]
    match = difflib.get_close_matches(text, names, n=1)
    hint = f" — did you mean '{match[0]}'?" if match else ""
    raise ConfigError(
        f"unknown recipe '{text}'{hint} (run `tune ls` for the recipes, or pass a path to a .py)"
    )


def find_recipe_for_config(config_name: str) -> RecipeSpec | None:
    """The registered recipe that lists ``config_name`` (a built-in name), or None."""
    name = config_name[:-5] if config_name.endswith(".yaml") else config_name
    for spec in RECIPES.values():
        if name in spec.configs:
            return spec
    return None


def load_recipe_module(path: str | Path) -> ModuleType:
    """Import a recipe script as a module without running its ``__main__`` block.

    The module gets a private name (``_tunelab_recipe_<stem>``) so it never shadows a real
    package; it is registered in ``sys.modules`` because dataclasses look it up there.
    """
    path = Path(path).resolve()
    mod_name = f"_tunelab_recipe_{path.stem}_{abs(hash(str(path))):x}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import recipe file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def recipe_schema(path: str | Path, config_class: str = "RecipeConfig") -> type:
    """The settings dataclass declared by a recipe script.

    Raises:
        ConfigError: the script defines no dataclass named ``config_class``.
    """
    import dataclasses

    module = load_recipe_module(path)
    schema = getattr(module, config_class, None)
    if schema is None or not dataclasses.is_dataclass(schema):
        raise ConfigError(
            f"recipe {path} defines no dataclass '{config_class}' at top level, so its config "
            "cannot be validated"
        )
    return schema
