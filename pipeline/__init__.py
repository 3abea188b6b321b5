"""Training pipeline: data loading, DeepSpeed training, MLflow tracking, evaluation, the CLI."""
