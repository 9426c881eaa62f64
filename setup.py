"""Installs the repository's folders as one namespace:

    lvsa_kernels/  -> lvsa_kernels              (public API, dispatch, backends, CLI, diffusers shim)
    reference/     -> lvsa_kernels.reference    (layout, LVSA planner, reference attention)
    triton_src/    -> lvsa_kernels.triton_src   (Triton kernels)
    npu/           -> lvsa_kernels.npu          (Ascend torch_npu backend)
    bench/         -> lvsa_kernels.bench        (benchmark harness and result writers)

Nothing else lands at the top level of site-packages. torch_npu is never a dependency.
"""
from setuptools import setup

ROOTS = {
    "lvsa_kernels": "lvsa_kernels",
    "lvsa_kernels.reference": "reference",
    "lvsa_kernels.triton_src": "triton_src",
    "lvsa_kernels.npu": "npu",
    "lvsa_kernels.bench": "bench",
}
SUBPACKAGES = ["lvsa_kernels.backends", "lvsa_kernels.commands", "lvsa_kernels.diffusers", "lvsa_kernels.ring"]

setup(
    name="lvsa_kernels",
    version="0.1.0",
    description="Block-sparse attention kernels (Triton, FlashInfer, Ascend) for long-video diffusion transformers",
    license="Apache-2.0",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(list(ROOTS) + SUBPACKAGES),
    package_dir=ROOTS,
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "triton>=3.2", "matplotlib",
                "imageio", "imageio-ffmpeg", "ftfy", "peft"],
        "diffusers": ["diffusers>=0.42,<0.43", "transformers>=4.50", "accelerate"],
        "flashinfer": ["flashinfer-python>=0.6.7"],
        "video": ["imageio", "imageio-ffmpeg", "ftfy"],  # `lvsa-kernels generate`: mp4 output, prompt cleaning
    },
    entry_points={"console_scripts": ["lvsa-kernels=lvsa_kernels.__main__:main"]},
)
