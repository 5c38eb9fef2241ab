"""Memory in, fused bits out: work described by memory (``regions``: blocks at addresses, regions
of buffers), the engine that picks numba or numpy and the loader of the kernels, the numba
kernels (and their compile cache), their LLVM intrinsics, the numpy path and the CUDA engine.
Kernels never see key names, files, plans or numpy arrays.
"""
