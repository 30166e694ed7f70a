"""Vectorised PyTorch implementations (the CPU path)."""
