"""Build and install megatron-slm.

The extension ``megatron_slm._C`` is built from ``csrc/``:

* ``csrc/*.cpp``      always (C++17, -O3, OpenMP, -march tuned for the build host unless
                      ``MEGATRON_SLM_PORTABLE=1``);
* ``csrc/cuda/*.cu``  when torch has CUDA and nvcc is found (or ``MEGATRON_SLM_CUDA=1``).

Environment switches:

=========================  =====================================================================
``MEGATRON_SLM_BUILD_EXT``  ``0`` skips the extension entirely (pure-PyTorch fallbacks are used).
``MEGATRON_SLM_CUDA``       ``auto`` (default), ``1`` forces the CUDA build (fails without nvcc /
                            CUDA torch), ``0`` skips the CUDA sources.
``MEGATRON_SLM_PORTABLE``   ``1`` compiles the C++ without ``-march=native`` (for images built on
                            one machine and run on another; the Dockerfile sets it).
``TORCH_CUDA_ARCH_LIST``    CUDA architectures, e.g. ``"8.0;9.0"`` (torch's own variable).
``MAX_JOBS``                parallel compile jobs (torch's own variable, used with ninja).
=========================  =====================================================================
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _import_target_torch():
    """Import the torch of the environment we install into.

    Under pip's build isolation the target environment's site-packages are hidden, and listing
    torch as a build requirement would make pip download another (multi-GB, CUDA) torch. So we
    ask the target interpreter where its torch lives, with the isolation variables removed, and
    put that directory at the *end* of ``sys.path`` (the isolated setuptools keeps priority).
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
    except (subprocess.CalledProcessError, OSError):
        return None
    sys.path.append(out.stdout.strip().splitlines()[-1])
    try:
        import torch

        return torch
    except ImportError:
        return None


def _extensions():
    if _env_flag("MEGATRON_SLM_BUILD_EXT", "1") in ("0", "false", "no", "off"):
        print("megatron-slm: MEGATRON_SLM_BUILD_EXT=0, not building megatron_slm._C")
        return [], {}
    torch = _import_target_torch()
    if torch is None:
        print("megatron-slm: torch is not installed; install torch first to build megatron_slm._C")
        return [], {}
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}

    cuda_mode = _env_flag("MEGATRON_SLM_CUDA", "auto")
    have_nvcc = cpp_extension.CUDA_HOME is not None
    torch_has_cuda = torch.version.cuda is not None
    if cuda_mode in ("1", "true", "yes", "on"):
        if not (have_nvcc and torch_has_cuda):
            raise RuntimeError(
                "MEGATRON_SLM_CUDA=1 but "
                + ("torch was built without CUDA" if not torch_has_cuda else "nvcc was not found")
            )
        build_cuda = True
    elif cuda_mode in ("0", "false", "no", "off"):
        build_cuda = False
    else:
        build_cuda = have_nvcc and torch_has_cuda and bool(cu_sources)

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if _env_flag("MEGATRON_SLM_PORTABLE", "0") not in ("1", "true", "yes", "on"):
        cxx_flags.append("-march=native")
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    if build_cuda:
        ext = cpp_extension.CUDAExtension(
            "megatron_slm._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=[("MEGATRON_SLM_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            },
            extra_link_args=link_flags,
        )
        print(f"megatron-slm: building _C with CUDA ({len(cu_sources)} .cu files)")
    else:
        ext = cpp_extension.CppExtension(
            "megatron_slm._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        print("megatron-slm: building _C (C++ only)")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=_have_ninja())
    return [ext], {"build_ext": build_ext}


def _have_ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], capture_output=True, check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


ext_modules, cmdclass = _extensions()

# lm-eval has no plugin entry points: megatron_slm_lm_eval.pth (one guarded import of the tiny
# megatron_slm_lm_eval_hook module) registers `lm_eval --model megatron-slm` when lm-eval is
# imported. It must land in site-packages itself, for wheels (build_py) and editable installs.
PTH = "megatron_slm_lm_eval.pth"


def _with_pth(base):
    class WithPth(base):
        def run(self):
            super().run()
            self.copy_file(os.path.join(ROOT, PTH), os.path.join(self.build_lib, PTH))

    return WithPth


cmdclass["build_py"] = _with_pth(build_py)
try:
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWithPth(editable_wheel):
        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            shutil.copy(os.path.join(ROOT, PTH), unpacked_wheel)
            return out

    cmdclass["editable_wheel"] = EditableWithPth
except ImportError:  # setuptools < 64: no PEP 660 editable installs to hook into
    pass

setup(
    name="megatron-slm",
    version="0.1.0",
    description="Data-efficient LLM pretraining on megatron-core: Selective Language Modeling "
    "(Rho-1), ProX corpus refinement and tiny-LM recipes",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_slm", "megatron_slm.*"]),
    py_modules=["megatron_slm_lm_eval_hook"],
    package_data={
        # the teacher prompts of tools/prox_annotate.py: editable text files shipped in the wheel
        "megatron_slm.refine": ["prompts/*.txt"],
        "megatron_slm.evaluation.tasks": ["*.yaml", "*.txt"],
    },
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",
        "numpy",
        "sentencepiece",
        "protobuf>=3.20",  # editing SentencePiece model protos (tinylm prune)
        "tensorboard",
        "matplotlib>=3.5,<4",  # selection pictures, token dynamics, the quickstart curve
        "tqdm",
        "psutil",  # megatron-core distributed checkpointing needs it
        "tokenizers",  # GPT2BPETokenizer (Megatron-LM's vocab.json + merges.txt)
        "pyyaml",  # --export-kd-cfg (Megatron-LM's distillation settings)
        "einops",  # megatron-core's groups for --num-distributed-optimizer-instances > 1
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.40", "safetensors"],
        "lm-eval": ["lm-eval>=0.4.9,<0.5"],
        "wandb": ["wandb"],
        "tiktoken": ["tiktoken"],  # --tokenizer-type TikTokenizer
        # transformers[serving]: the ProX teacher test runs a real `transformers serve`
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",  # scripts/run_tests.sh runs the suite on every core
            "hypothesis>=6",
            "transformers[serving]>=5.0",
            "safetensors",
            "ruff",
            "websocket-client>=1.6,<2",  # headless Chromium test (DevTools protocol)
            # [api]: lm-eval's local-completions model, run against the generation server
            "lm-eval[api]>=0.4.9,<0.5",
            "accelerate",  # lm-eval's hf model, the reference of the adapter's tests
            "wandb",  # --wandb-project: the offline run file is read back
            "tiktoken",  # --tokenizer-type TikTokenizer, against megatron-core's own
        ],
        "dev": ["pytest>=7", "hypothesis>=6", "transformers>=4.40", "safetensors", "ruff", "ninja"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
