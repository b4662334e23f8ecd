"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied from outside the model, torchtitan-style.

Each decoder block is one FSDP unit; everything else (embeddings, final norm, LM head, gates) is
the root unit. Pondering models apply the same block R times per forward: FSDP2 all-gathers the
block's parameters for every application (and again for every application's backward), and
reduce-scatters after each application's backward into the one sharded gradient, which therefore
holds the sum over all R iterations, as in a single-device run. There is exactly one parameter
set per block; nothing is duplicated per iteration.

The LightningModule computes its loss in `training_step` (the fused LM-head loss reads
`embed_out.weight` directly), not in `forward`, so those step methods are registered as FSDP
forward methods: the root's parameters are gathered for the whole step.
"""

from __future__ import annotations

from torch import nn

from ponder_lightning.nn.backbone import Backbone

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def shard_model(module: nn.Module, mesh: object, reshard_after_forward: bool = True) -> nn.Module:
    """Apply `fully_shard` to every decoder block of every `Backbone` inside `module`, then to
    `module` itself; returns `module` (changed in place). Idempotent.

    `mesh` is a `DeviceMesh`. A 1-D mesh, or a 2-D mesh with one dimension of size 1, shards over
    all its ranks (FSDP). A 2-D mesh with both dimensions > 1 is taken as (replicate, shard), i.e.
    HSDP: Lightning's `ModelParallelStrategy` default mesh is (nodes, GPUs per node), so parameters
    are sharded within a node and replicated across nodes. Either way every rank is a data-parallel
    rank and gradients are averaged over all of them.

    `reshard_after_forward=False` keeps each block gathered from its first application to its
    backward (less communication for R > 1, more memory).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return module
    mesh = _fsdp_mesh(mesh)
    for backbone in (m for m in module.modules() if isinstance(m, Backbone)):
        for block in backbone.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh)
    for name in STEP_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return module


def _fsdp_mesh(mesh: object) -> object:
    """The mesh to shard over: HSDP's 2-D mesh as is, otherwise a 1-D mesh over all ranks."""
    if mesh.ndim == 1:
        return mesh
    if mesh.ndim != 2:
        raise ValueError(f"shard_model supports 1-D (FSDP) or 2-D (HSDP) device meshes, got {mesh.ndim}-D")
    sizes = tuple(mesh.shape)
    if min(sizes) > 1:
        return mesh
    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError("shard_model needs a 2-D device mesh with named dimensions")
    return mesh[names[0] if sizes[0] > 1 or sizes[1] == 1 else names[1]]
