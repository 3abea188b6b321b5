"""Evaluation: sharded sampling to PNG folders and FID against per-dataset reference statistics."""
