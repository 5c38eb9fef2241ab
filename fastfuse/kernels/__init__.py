"""Arrays or device buffers in, fused bits out: the engine that picks numba or numpy, the numba
kernels (and their compile cache), their LLVM intrinsics, and the numpy path. Kernels never see
key names, files or plans.
"""
