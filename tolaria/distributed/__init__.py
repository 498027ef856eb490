"""torch.distributed glue: Tolaria on several processes and machines, launched with ``torchrun``.

Every rank holds a full replica of the model and sees its own shard of the data. A multi-source step
stays exact and the replicas stay identical because:

1. each rank fills its K x N :class:`~tolaria.aggregation.GradientBuffer` from its shard;
2. :func:`allreduce_gradient_buffer` averages the buffer over ranks (one bucketed all-reduce), so
   every rank holds the buffer of the combined batch (the mean of equal-sized per-rank mean losses
   is the combined batch's mean loss);
3. every rank runs the same aggregation on the same buffer with a generator seeded identically
   (:func:`synchronized_generator`), so PCGrad's shuffles, the ``.grad`` and the optimizer step agree
   bit for bit.

Around the step: :func:`shard` (``DistributedSampler``), :func:`agree_on_emergency_level` (HALT on any
rank stops every rank at the next step boundary), :func:`checkpoint_barrier` and
:func:`resume_from_checkpoint` (rank 0 writes, every rank resumes), :func:`rank_telemetry` (one
JSONL file per rank, records tagged with the rank), :func:`ddp_wrap` (the single-source path) and
:func:`verify_replicas` (a cheap bitwise check that the replicas agree).

Every function works unchanged in a single process (a :class:`DistributedContext` with
``world_size == 1`` and no process group), where the collectives are no-ops.

The package, by concern (every public name is importable from ``tolaria.distributed`` itself):

- :mod:`~tolaria.distributed.context` -- :class:`DistributedContext` (joining the process group) and
  the errors;
- :mod:`~tolaria.distributed.group_release` -- :func:`release_process_groups` (leaving it for good:
  destroyed groups freed, their worker threads ended before Python shuts down);
- :mod:`~tolaria.distributed.sharding` -- :func:`shard` and :class:`ShardedLoader`;
- :mod:`~tolaria.distributed.sharded_modes` -- :data:`SHARDING_MODES` (none, zero, fsdp: the gradient
  buffer replicated or sharded by columns) and :func:`fsdp_wrap`;
- :mod:`~tolaria.distributed.collectives` -- the bucketed gradient all-reduce, :func:`allreduce_mean`,
  :func:`any_rank`, :func:`broadcast_json`, :func:`all_gather_json` and :func:`broadcast_tree`;
- :mod:`~tolaria.distributed.replicas` -- :func:`synchronized_generator`,
  :func:`broadcast_module_state`, the replica and buffer-layout checks, :func:`ddp_wrap`;
- :mod:`~tolaria.distributed.coordination` -- the emergency agreement, :func:`checkpoint_barrier`,
  :func:`resume_from_checkpoint` and the rollback agreement (:func:`agree_on_rollback`,
  :func:`adopt_main_state`);
- :mod:`~tolaria.distributed.telemetry` -- :func:`rank_telemetry` and its parts.
"""

from tolaria.distributed.collectives import (
    DEFAULT_BUCKET_MB,
    all_gather_json,
    allreduce_gradient_buffer,
    allreduce_mean,
    allreduce_mean_grads,
    any_rank,
    broadcast_json,
    broadcast_tree,
    bucket_slices,
)

# DEFAULT_TIMEOUT_S, LAUNCH_ENV_VARS and MAX_SEED were importable from the single module outside its
# __all__ (the trainer tests import LAUNCH_ENV_VARS): the "X as X" imports keep them so, __all__ unchanged.
from tolaria.distributed.context import DEFAULT_TIMEOUT_S as DEFAULT_TIMEOUT_S
from tolaria.distributed.context import LAUNCH_ENV_VARS as LAUNCH_ENV_VARS
from tolaria.distributed.context import (
    DistributedContext,
    DistributedError,
    ReplicaMismatchError,
)
from tolaria.distributed.coordination import (
    EmergencyAgreement,
    RollbackAgreement,
    adopt_main_state,
    agree_on_emergency,
    agree_on_emergency_level,
    agree_on_rollback,
    checkpoint_barrier,
    resume_from_checkpoint,
)
from tolaria.distributed.group_release import release_process_groups
from tolaria.distributed.replicas import MAX_SEED as MAX_SEED
from tolaria.distributed.replicas import (
    broadcast_module_state,
    ddp_wrap,
    synchronized_generator,
    tensor_fingerprint,
    verify_buffer_layout,
    verify_replicas,
)
from tolaria.distributed.sharded_modes import SHARDING_MODES, check_sharding, fsdp_wrap
from tolaria.distributed.sharding import ShardedLoader, shard
from tolaria.distributed.telemetry import (
    bind_rank,
    rank_telemetry,
    shared_run_id,
    telemetry_file_name,
)

__all__ = [
    "DEFAULT_BUCKET_MB",
    "DistributedContext",
    "DistributedError",
    "EmergencyAgreement",
    "ReplicaMismatchError",
    "RollbackAgreement",
    "SHARDING_MODES",
    "ShardedLoader",
    "adopt_main_state",
    "agree_on_emergency",
    "agree_on_emergency_level",
    "agree_on_rollback",
    "all_gather_json",
    "allreduce_gradient_buffer",
    "allreduce_mean",
    "allreduce_mean_grads",
    "any_rank",
    "bind_rank",
    "broadcast_json",
    "broadcast_module_state",
    "broadcast_tree",
    "check_sharding",
    "bucket_slices",
    "checkpoint_barrier",
    "ddp_wrap",
    "fsdp_wrap",
    "rank_telemetry",
    "release_process_groups",
    "resume_from_checkpoint",
    "shard",
    "shared_run_id",
    "synchronized_generator",
    "telemetry_file_name",
    "tensor_fingerprint",
    "verify_buffer_layout",
    "verify_replicas",
]
