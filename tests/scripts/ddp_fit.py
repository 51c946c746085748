"""Fit SASRec on planted data and write its test NDCG@10 and a weight checksum (one JSON per rank).

Run as ``python ddp_fit.py OUT`` (one process) or ``torchrun --nproc_per_node 2 ddp_fit.py OUT`` (data-parallel);
``tests/test_distributed.py`` compares the two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recforge import split as S
from recforge.data.datasets import make_synthetic
from recforge.evaluation import evaluate
from recforge.models import create_model
from recforge.neural import distributed as D
from recforge.neural.trainer import Trainer


def main(out: Path, loss: str) -> None:
    rows = []
    to_device = Trainer.to_device

    def counting_to_device(self: Trainer, batch: dict) -> dict:  # records the rows this rank trains on
        rows.append(len(next(iter(batch.values()))))
        return to_device(self, batch)

    Trainer.to_device = counting_to_device
    data = make_synthetic(n_users=300, n_items=200, n_interactions=12_000, n_clusters=5, sequential_strength=0.2,
                          seed=7).deduplicate("last")
    split = S.leave_one_out(data)
    model = create_model("sasrec", n_factors=32, max_len=20, epochs=12, batch_size=64, lr=3e-3, dropout=0.1,
                         loss=loss, n_heads=1, n_layers=1, progress=False, num_threads=1, seed=0)
    model.fit(split.train_valid)
    ndcg = evaluate(model, split.test, k=10)["ndcg@10"]
    pop = evaluate(create_model("pop").fit(split.train_valid), split.test, k=10)["ndcg@10"]
    checksum = float(sum(p.detach().double().sum().item() for p in model.net_.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{D.rank()}.json").write_text(json.dumps({
        "ndcg@10": ndcg, "pop_ndcg@10": pop, "checksum": checksum, "world_size": D.world_size(),
        "rows_trained": int(sum(rows))}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "softmax")
