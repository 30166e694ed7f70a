"""Compiled CPU kernels (numba), for ops whose elementwise torch path stays far from memory speed."""
