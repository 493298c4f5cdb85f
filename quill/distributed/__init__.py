"""Tensor parallelism on torch.distributed: one model split over several processes (or machines),
rank 0 running the engine and broadcasting each step to the others.

- `shard.py`: which slice of each tensor a rank holds; the refusal of models that do not split.
- `layers.py`: the row-parallel sum, vocabulary-parallel embedding and LM head.
- `model.py`: a rank's share built from the checkpoint.
- `channel.py`: rank 0's messages (cache shape, steps, stop) as int64 broadcasts.
- `group.py`: process group setup (spawned locally, or from torchrun's environment).
- `worker.py`: the ranks past 0; `launch.py`: rank 0.

Nothing here is imported by a single-process run.
"""
from quill.distributed.launch import TensorParallel, serve_as_worker, start_tensor_parallel

__all__ = ["TensorParallel", "serve_as_worker", "start_tensor_parallel"]
