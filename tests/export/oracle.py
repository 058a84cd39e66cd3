"""llama.cpp as a test oracle: llama-cpp-python is its own extra (``gguf-oracle``) because it
builds llama.cpp from source while installing (minutes on two cores)."""

from __future__ import annotations

import os

import pytest


def llama_cpp_or_skip():
    """The ``llama_cpp`` module; without it the calling test skips with how to install it.
    Under CI (which installs the extra) a missing module is a failure, not a skip."""
    if os.environ.get("CI"):
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF oracle) is not installed: "
                               "pip install -e '.[gguf-oracle]'")
