"""maskdm: Masked Diffusion Models are Fast Learners, as a training pipeline.

Install torch first on CPU-only machines (``pip install torch==2.13.0``): a bare ``torch``
requirement would otherwise pull a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="maskdm",
    version="0.1.0",
    description="MaskDM: masked score matching pre-training for U-ViT diffusion models, "
    "on DWT WebDataset shards, with DALI, DeepSpeed ZeRO and MLflow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "model", "model.*",
                                    "preprocessing", "preprocessing.*"]),
    package_data={"pipeline": ["resources/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pillow>=10.0",
        "PyWavelets>=1.4",
        "webdataset>=0.2.86",
        # DeepSpeed 0.19.x is what the tests run against; the engine API used here is stable.
        "deepspeed>=0.14,<0.20",
        # 3.18.0's mlflow-skinny is missing from some indexes; 3.17.2 is the tested version.
        "mlflow>=2.12,<3.18",
        "scipy>=1.10",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        # GPU decode. `dali` follows NVIDIA's CUDA 12 build; `dali-cuda13` is the CUDA 13 build
        # (half the download; also runs the CPU-only pipelines the tests use).
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "dali-cuda13": ["nvidia-dali-cuda130>=2.0"],
        "xformers": ["xformers>=0.0.28"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2"],
    },
    entry_points={"console_scripts": ["maskdm = pipeline.cli:main"]},
)
