"""maskdm: Masked Diffusion Models are Fast Learners, as a training pipeline.

The import namespace of the project. Each subpackage lives in a top-level folder of the source
tree and owns one layer; data flows one way through them:

- ``maskdm.preprocessing`` (``preprocessing/``): raw images -> shard folders (``maskdm shard``).
- ``maskdm.shardformat`` (``shardformat/``): the shard format itself (manifest, tar + DALI index,
  lossless Haar, atomic files, the random-access reader); written by preprocessing, read by the
  pipeline.
- ``maskdm.model`` (``model/``): architecture only (U-ViT, masks, torch Haar, diffusion,
  objectives).
- ``maskdm.pipeline`` (``pipeline/``): data loading, training, tracking, evaluation, the CLI.
- ``maskdm.deepspeed_configs`` (``deepspeed_configs/``): ZeRO stage + precision JSON files.
"""

__version__ = "0.3.0"
