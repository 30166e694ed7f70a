"""Triton implementations (the GPU path; runs on CPU tensors under TRITON_INTERPRET=1)."""
