"""Tensor parallelism over torch.distributed, above the engine (docs/distributed.md).

    engine = Engine(ckpt, tensor_parallel_size=N)   # every rank, in the group torchrun made
    result = run(engine, main)                      # rank 0: main(engine) (add_request/step as usual);
                                                    # other ranks: follow rank 0's calls, return None

The sharded model itself is anygpt_engine.models.tensor_parallel; this layer drives the ranks:
rank 0 broadcasts each model call's inputs (the step plan), the others replay them."""

from anygpt_engine.distributed.launch import init_from_env
from anygpt_engine.distributed.plan import Leader, follow, run
from anygpt_engine.models.tensor_parallel import RankFailure

__all__ = ["Leader", "RankFailure", "follow", "init_from_env", "run"]
