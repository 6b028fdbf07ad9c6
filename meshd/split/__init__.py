"""Layer split: one model served across trusted peers with llama.cpp's RPC backend (docs/split.md)."""
