"""Offline preprocessing: raw images -> Haar-DWT WebDataset shards (the format is ``maskdm.shardformat``).

Modules: ``images`` (decode, validate, crop/resize), ``procedural`` (the built-in face-like image
set), ``sources`` (what to read), ``shard_job`` (the resumable ``maskdm shard`` job), ``verify``
(``--verify``), ``preview`` and ``cli``.
"""
