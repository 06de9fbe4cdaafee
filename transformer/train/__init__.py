"""Training: the optimizer, the pure jitted step, and the loop with its side effects (checkpoints, progress,
signals, throughput). The top wing: it knows the task protocol, never a task's internals."""
from transformer.train.loop import TrainingDiverged, train
from transformer.train.progress import METRICS_FILE
from transformer.train.setup import build_state, run_dir_of

__all__ = ["METRICS_FILE", "TrainingDiverged", "build_state", "run_dir_of", "train"]
