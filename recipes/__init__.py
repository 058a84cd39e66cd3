"""Recipes: one self-contained script per recipe (``registry.py`` lists them and their configs)."""
