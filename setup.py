"""maskdm: Masked Diffusion Models are Fast Learners, as a training pipeline.

Install torch first (see the README: on CPU-only machines take PyTorch's CPU wheel): a bare
``torch`` requirement would otherwise pull a multi-GB CUDA build.

The source tree keeps one top-level folder per layer (``preprocessing/``, ``shardformat/``,
``model/``, ``pipeline/``, ``deepspeed_configs/``); all of them are installed under the one import
namespace ``maskdm`` (``maskdm.model``, ``maskdm.pipeline``, ...), so nothing named ``model`` or
``pipeline`` lands in site-packages. Editable installs map the same names onto the folders.
"""

from setuptools import setup

LAYERS = ("preprocessing", "shardformat", "model", "pipeline", "pipeline.data", "pipeline.eval",
          "pipeline.experiment",
          "deepspeed_configs")

setup(
    name="maskdm",
    version="0.3.0",
    description="MaskDM: masked score matching pre-training for U-ViT diffusion models, "
    "on DWT WebDataset shards, with DALI, DeepSpeed ZeRO and MLflow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["maskdm"] + [f"maskdm.{name}" for name in LAYERS],
    package_dir={"maskdm": "maskdm",
                 **{f"maskdm.{name}": name.replace(".", "/") for name in LAYERS}},
    package_data={"maskdm.deepspeed_configs": ["*.json"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pillow>=10.0",
        "PyWavelets>=1.4",
        # DeepSpeed 0.19.x is what the tests run against; the engine API used here is stable.
        "deepspeed>=0.14,<0.20",
        # 3.18.0's mlflow-skinny is missing from some indexes; 3.17.2 is the tested version.
        "mlflow>=2.12,<3.18",
        "scipy>=1.10",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "matplotlib>=3.5",  # the experiment's plots
        # MLflow's system metrics: CPU/memory/disk/network (psutil) and NVIDIA GPUs (nvidia-ml-py,
        # which does nothing where there is no GPU).
        "psutil>=5.9",
        "nvidia-ml-py>=12.0",
        # shard folders in object storage (s3://, gs://, http(s)://): the filesystem layer; each
        # store's driver is an extra below.
        "fsspec>=2024.3",
    ],
    extras_require={
        # GPU decode. `dali` follows NVIDIA's CUDA 12 build; `dali-cuda13` is the CUDA 13 build
        # (half the download; also runs the CPU-only pipelines the tests use).
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "dali-cuda13": ["nvidia-dali-cuda130>=2.0"],
        "xformers": ["xformers>=0.0.28"],
        # object storage drivers for fsspec (credentials come from each store's own environment)
        "s3": ["s3fs>=2024.3"],
        "gcs": ["gcsfs>=2024.3"],
        "http": ["aiohttp>=3.9"],
        # benchmarks/peers.py: the peer data pipelines (never runtime dependencies). Both
        # MosaicML streaming and LitData require torchvision, which pins its own torch: install
        # them where torch and torchvision match (docs/benchmarks.md).
        "bench": ["webdataset>=0.2.86", "mosaicml-streaming>=0.13", "litdata>=0.2.70"],
        # webdataset: the tests read our shards with it, proving any WebDataset reader can.
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "webdataset>=0.2.86",
                # the MLflow UI check (tests/ui_check.py; needs Chromium + ChromeDriver too)
                "selenium>=4.20",
                # object storage tests: a real S3-compatible server (moto's) on 127.0.0.1
                "s3fs>=2024.3", "moto[server]>=5.0", "aiohttp>=3.9"],
    },
    entry_points={"console_scripts": ["maskdm = maskdm.pipeline.cli:main"]},
)
