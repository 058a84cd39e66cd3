"""GGUF export: llama.cpp file format writer and block quantizers (optional `gguf` extra)."""
