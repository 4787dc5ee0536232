"""Fine-tuning tests' shared pieces: the public split they pretrain on, a checkpoint pretrained
on it, and a client built the way a SuperNode builds it."""

from __future__ import annotations

from pathlib import Path

from flwr.common import Context, RecordDict

from app.client_app import build_client
from app.pretrain import pretrain

PUBLIC = "dataset.public_fraction=0.2"


def pretrain_on_public_split(path: Path, epochs: int = 5):
    """The default mlp pretrained on digits' public split; returns (path, pretrain metadata)."""
    meta = pretrain([PUBLIC], path, epochs=epochs)
    return path, meta


def client_for(cfg, partition_id=0, num_partitions=4, node_config=None):
    """The ClientApp's client for partition `partition_id` of `num_partitions`."""
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions, **(node_config or {})},
        state=RecordDict(),
        run_config={},
    )
    return build_client(cfg, ctx)
