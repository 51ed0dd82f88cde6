"""Training beyond one process (docs/distributed.md): torchrun, dense weights data-parallel (DDP),
every Engram table row-sharded across ranks.

``engram.distributed.env``: the process group from torchrun's environment. ``engram.distributed.sharded``:
:class:`RowShardedEmbedding`, a :class:`~engram.nn.memory.TableStorage` that owns about 1/N of each head's
rows and exchanges ids and rows with ``all_to_all_single``. ``engram.distributed.trainer``:
:class:`DistributedTrainer` (the single-process :class:`~engram.training.loop.Trainer` with rank slices of the
global batch, DDP and sharded tables). ``engram.distributed.checkpoint``: per-rank table shards in
``torch.distributed.checkpoint`` (DCP) format, resharded on load.
"""
