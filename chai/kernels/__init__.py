"""Fused GPU kernels for the methods' hot paths, each beside a pure-PyTorch reference it is tested against."""
