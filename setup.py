"""Builds hyperfused._C from csrc/: a CppExtension with CPU-only torch, a CUDAExtension when torch has CUDA
and nvcc is found (or HYPERFUSED_FORCE_CUDA=1). Metadata lives in pyproject.toml.

Build with `pip install --no-build-isolation .` so the extension compiles against the torch you run.
"""
import glob
import os
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _pip_cuda_home():
    """The CUDA toolkit that the nvidia-cuda-nvcc wheel installs, if present (see docs/building.md)."""
    candidate = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
    return candidate if os.path.exists(os.path.join(candidate, "bin", "nvcc")) else None


def _want_cuda(torch):
    if os.environ.get("HYPERFUSED_FORCE_CUDA") == "1":
        return True
    if os.environ.get("HYPERFUSED_NO_CUDA") == "1" or torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None


def extensions():
    if os.environ.get("HYPERFUSED_NO_EXTENSION") == "1":
        return [], {}
    if "CUDA_HOME" not in os.environ and _pip_cuda_home():
        os.environ["CUDA_HOME"] = _pip_cuda_home()
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets the compiler if-convert, hence vectorise, the kernels' clamps and selects
    # (nothing here relies on floating-point traps). -march=native uses the build machine's vector width;
    # HYPERFUSED_PORTABLE=1 builds for the baseline ISA instead (for binaries that travel).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if os.environ.get("HYPERFUSED_PORTABLE") != "1":
        cxx.append("-march=native")
    kwargs = dict(name="hyperfused._C", extra_link_args=["-fopenmp"], py_limited_api=False)
    if _want_cuda(torch):
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(sources=sources, define_macros=[("WITH_CUDA", None)],
                                          extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"hyperfused: building {'CUDA' if 'nvcc' in ext.extra_compile_args else 'CPU-only'} extension "
          f"from {len(sources)} sources", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
