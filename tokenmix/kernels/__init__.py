"""Fused Triton kernels behind the functional ops (imported only when a kernel is chosen; see
``tokenmix.backend``). Each is verified against the reference path of its op."""
