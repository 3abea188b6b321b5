"""Streaming data: shards -> deterministic, resumable batches on the training device.

``order`` (pure sample order), ``shards`` (random-access reads), ``transform`` (model space on the
device), ``torch_loader`` and ``dali_loader`` (two backends, one interface), ``loader`` (the
factory and the resumable state).
"""
