"""Pre-training on Ray Train: typed config, optimizer setup, the worker loop, MLflow tracking, the driver."""

from concerto_ray.train.config import PretrainConfig, load_pretrain_config
from concerto_ray.train.trainer import run_pretrain

__all__ = ["PretrainConfig", "load_pretrain_config", "run_pretrain"]
