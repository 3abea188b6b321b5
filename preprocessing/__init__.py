"""Offline preprocessing: raw images -> Haar-DWT WebDataset shards (format version 1).

Modules: ``images`` (decode, validate, crop/resize), ``haar`` (lossless float16 Haar),
``procedural`` (the built-in face-like image set), ``sources`` (what to read), ``tarfmt``
(deterministic tar + DALI index), ``manifest`` (the dataset contract), ``shard`` (the resumable job),
``verify`` and ``preview``.
"""

FORMAT_VERSION = 1
