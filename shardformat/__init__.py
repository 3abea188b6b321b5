"""The shard format (version 1), shared by the writer (``maskdm.preprocessing``) and the readers
(``maskdm.pipeline``): ``manifest`` (the dataset contract), ``tarfmt`` (deterministic tar + DALI
index), ``haar`` (the lossless float16 Haar DWT of uint8 images and the tensor layout),
``fsutil`` (atomic files) and ``reader`` (random-access reads of samples, damage detection).
"""

FORMAT_VERSION = 1
