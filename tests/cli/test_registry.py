"""The real registry: recipe files, their settings classes and the shipped configs agree."""

from __future__ import annotations

import dataclasses

import pytest

from tunelab.recipes.registry import (
    RECIPES,
    available_recipes,
    find_recipe_for_config,
    recipe_file,
    recipe_schema,
)
from tunelab.training.config import builtin_config_names, load_config, parse_config

SHIPPED = [(spec, name) for spec in available_recipes() for name in spec.available_configs()]


def test_registry_names_and_lookup():
    assert "lora_finetune_single_device" in RECIPES and "generate" in RECIPES
    assert find_recipe_for_config("tiny/lora").name == "lora_finetune_single_device"
    assert find_recipe_for_config("llama3_1/8B_lora_single_device.yaml").name == (
        "lora_finetune_single_device"
    )
    assert find_recipe_for_config("nope/x") is None
    for spec in available_recipes():
        assert recipe_file(spec.name) == spec.file


def test_every_builtin_config_belongs_to_a_recipe():
    registered = {c for spec in RECIPES.values() for c in spec.configs}
    assert set(builtin_config_names()) <= registered, "add new configs to recipes/registry.py"


@pytest.mark.parametrize("spec,name", SHIPPED, ids=[n for _, n in SHIPPED])
def test_shipped_config_parses_with_its_recipe_schema(spec, name):
    """Keys, types and every _component_ of each shipped config (paths are not checked)."""
    schema = recipe_schema(spec.file, spec.config_class)
    assert dataclasses.is_dataclass(schema)
    parse_config(load_config(name), schema)
