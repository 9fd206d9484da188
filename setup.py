"""Builds anygpt_engine: the Python runtime, the Triton kernels (kernels/ installed as
anygpt_engine.kernels) and the pybind11 extension anygpt_engine._C, compiled by CMake.

Environment:
  ANYGPT_CUDA_ARCH   CUDA architectures for CMake (default "90"; e.g. "90a" or "80;90")
  ANYGPT_NO_CUDA=1   build the CPU kernels only even when nvcc is found
  CUDA_HOME          where to look for nvcc when it is not on PATH
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def find_cmake():
    found = shutil.which("cmake")
    if found:
        return found
    import cmake  # the PyPI package, a build requirement

    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DANYGPT_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('ANYGPT_CUDA_ARCH', '90')}",
        ]
        nvcc = find_nvcc()
        if os.environ.get("ANYGPT_NO_CUDA") == "1" or nvcc is None:
            args.append("-DANYGPT_WITH_CUDA=OFF")
        else:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        cmake = find_cmake()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)


setup(
    name="anygpt-engine",
    version="0.1.0",
    description="Inference engine for AnyGPT-style any-to-any models (LLaMA backbone over an extended vocabulary)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["anygpt_engine", "anygpt_engine.*"]), "anygpt_engine.kernels"],
    package_dir={"anygpt_engine.kernels": "kernels"},
    package_data={"anygpt_engine": ["tuning/*.json"]},
    ext_modules=[CMakeExtension("anygpt_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "tqdm",
        "soundfile",  # wav files for the speech and music pipelines (bundles libsndfile)
        # Text tokenizers of checkpoints (anygpt_engine.tokenizer): tokenizer.json and tokenizer.model.
        "tokenizers",
        "sentencepiece",
        # `anygpt-engine serve` (anygpt_engine.serving): the HTTP server, multipart uploads, /metrics,
        # and the HTTP client of `anygpt-engine bench serve`.
        "fastapi>=0.100",
        "uvicorn>=0.23",
        "python-multipart>=0.0.9",
        "prometheus_client>=0.17",
        "aiohttp>=3.9",
    ],
    extras_require={
        # Also, with --no-deps (their torchaudio pins break a CPU torch): speechtokenizer==1.0.1
        # encodec==0.1.1, whose quantizers the RVQ tests compare against (README's Quick start).
        # protobuf: transformers converts the tests' tokenizer.model files to tokenizer.json with it;
        # scipy: resample_poly, the oracle of codecs.audio.resample.
        # openai: the official client the serving tests drive the server with.
        # diffusers, pillow: the SEED image tokenizer's tests (PIL input, the unCLIP pipeline's wiring).
        "test": ["pytest", "hypothesis", "transformers>=4.40", "einops", "protobuf", "scipy", "openai>=1.0",
                 "diffusers>=0.30", "pillow"],
        "hf": ["transformers>=4.40"],
        # SeedImageTokenizer.decode: Stable Diffusion 2.1 unCLIP through diffusers (its CLIP text and
        # image encoders come from transformers); PIL images in and out.
        "image": ["diffusers>=0.30", "transformers>=4.40", "pillow"],
        "gpu": ["nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["anygpt-engine=anygpt_engine.cli:main"]},
    zip_safe=False,
)
