"""Build of topv: the Python package, ``topv.triton_kernels`` and the C++ extension ``topv._C``.

Environment switches (also listed in the README):

* ``TOPV_BUILD_EXT=0`` skips the C++ extension entirely (pure-Python install).
* ``TOPV_BUILD_CUDA=0/1`` forces the CUDA sources off or on. By default they are built when torch
  has CUDA and nvcc is found; otherwise the install says what it skipped and goes on.
* ``TORCH_CUDA_ARCH_LIST`` defaults to the visible GPUs' archs, else "9.0" (Hopper). A plain 9.0
  builds as "9.0a" (sm_90a: the wgmma cost GEMM, ``-DTOPV_HAS_SM90A=1``); ``TOPV_NO_SM90A=1``
  keeps plain 9.0 (the mma.sync GEMM only).

Install with ``pip install --no-build-isolation -e .`` so the extension builds against the torch
that will load it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"[topv setup] {msg}", file=sys.stderr)


def _cuda_archs(torch) -> list[str]:
    """The CUDA arch list: TORCH_CUDA_ARCH_LIST, else the visible GPUs' archs, else 9.0, with 9.0
    turned into 9.0a unless TOPV_NO_SM90A=1. sm_90a SASS runs on the same devices as sm_90 SASS
    (compute capability 9.0); only "9.0+PTX" loses something: its PTX no longer JITs to newer GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        archs = [a for a in env.replace(" ", ";").split(";") if a]
    elif torch.cuda.is_available():
        archs = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    else:
        archs = ["9.0"]
    if os.environ.get("TOPV_NO_SM90A") != "1":
        archs = ["9.0a" + a[3:] if a.split("+")[0] == "9.0" else a for a in archs]
    return archs


def _extensions():
    if os.environ.get("TOPV_BUILD_EXT", "1") == "0":
        _say("TOPV_BUILD_EXT=0: skipping the C++ extension topv._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time: skipping topv._C (install torch first, then "
             "reinstall with --no-build-isolation)")
        return [], {}

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        _say("no C++ sources under csrc/: skipping topv._C")
        return [], {}

    force = os.environ.get("TOPV_BUILD_CUDA")
    cuda_ok = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force == "1" and not cuda_ok:
        raise RuntimeError(
            "TOPV_BUILD_CUDA=1 but CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    build_cuda = bool(cu) and (force == "1" or (force != "0" and cuda_ok))
    if cu and not build_cuda:
        why = "TOPV_BUILD_CUDA=0" if force == "0" else (
            "torch has no CUDA" if torch.version.cuda is None else "nvcc/CUDA_HOME not found")
        _say(f"skipping the CUDA sources ({why}); building the C++ CPU kernels only")

    include = [os.path.join(ROOT, "csrc", "include")]
    # torch >= 2.14 headers need C++20; older ones build with C++17.
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    cxx = ["-O3", std, "-fopenmp"]
    define = [("TOPV_WITH_CUDA", "1")] if build_cuda else []
    # An empty PyInit__C: importing topv._C only loads the library (the ops are torch ops).
    # py_limited_api: torch's build defines Py_LIMITED_API itself for such extensions.
    common = dict(include_dirs=include, define_macros=define, py_limited_api=True, extra_link_args=["-fopenmp"])
    if build_cuda:
        archs = _cuda_archs(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        nvcc = ["-O3", std, "--use_fast_math", "-lineinfo"]
        # The launcher (host code) may pick the wgmma kernels only when the build has sm_90a code.
        sm90a = any(a.split("+")[0] == "9.0a" for a in archs)
        if sm90a:
            nvcc.append("-DTOPV_HAS_SM90A=1")
        _say(f"CUDA archs {';'.join(archs)}; wgmma cost GEMM "
             + ("on (sm_90a)" if sm90a else "off (no 9.0a in the list)"))
        ext = cpp_extension.CUDAExtension(
            "topv._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    else:
        ext = cpp_extension.CppExtension("topv._C", cpp, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="topv",
    version="0.1.0",
    description="Fused GPU kernels for TopV visual-token pruning in vision-language models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["topv", "topv.integrations", "topv.integrations.families", "topv.integrations.scorers", "topv.testing",
              "topv.triton_kernels"],
    # Our Triton kernels live in triton_kernels/ but install as topv.triton_kernels: a top-level
    # `triton_kernels` module belongs to other PyPI packages.
    package_dir={"topv": "topv", "topv.integrations": "topv/integrations",
                 "topv.integrations.families": "topv/integrations/families",
                 "topv.integrations.scorers": "topv/integrations/scorers", "topv.testing": "topv/testing",
                 "topv.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton>=3.2"], "hf": ["transformers>=5.17"], "test": ["pytest", "pot", "numpy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
