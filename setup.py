"""Pure-Python install by default. CUDA sources under csrc/ are built only when asked:

    W2VBERT_FAST_BUILD_CUDA=1 pip install .      # needs a CUDA build of torch and nvcc

Without the flag (or without any CUDA source yet) nothing is compiled and the Triton kernels are used.
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("W2VBERT_FAST_BUILD_CUDA", "0") in ("", "0"):
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        print("W2VBERT_FAST_BUILD_CUDA=1 but csrc/ holds no CUDA sources yet: nothing to build")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError("W2VBERT_FAST_BUILD_CUDA=1 needs a CUDA build of torch; this one is CPU-only")
    extension = CUDAExtension(
        "w2vbert_fast._cuda",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
