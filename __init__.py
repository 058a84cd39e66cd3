"""tunelab: hackable, PyTorch-native recipes for fine-tuning Llama-family LLMs.

Research code usually imports the pieces directly::

    from tunelab.models import from_pretrained, save_pretrained
    from tunelab.data import load_tokenizer
    from tunelab.modules.peft import LoRALinear
"""

__version__ = "0.1.0"
