"""Fused GPU kernels of the engine (Triton): column sums of the softmax without a T x T map."""
