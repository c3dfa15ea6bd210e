"""Two CPU ranks (DDP, gloo) train on a prepared dataset; each writes the samples it read.

    python tests/scripts/ddp_data_ranks.py DATA_DIR OUT_DIR [SECOND_DATA_DIR] [--then [NAME=VALUE ...] DATA_DIR ...]
    (run by tests/test_prepare.py as a subprocess)

With a second folder the ranks train two epochs of the two mixed by weights [1, 1], with two loader workers each,
and each writes how many batches it trained in each epoch. Runs split by ``--then`` train one after the other in the
same processes (two interpreters fewer to start); a run's leading ``NAME=VALUE`` arguments set the environment from
that run on.

The test starts both ranks at once (as a launcher would); run by hand, Lightning re-launches this script for rank 1.
Either way it must stay a script, never run inside pytest.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from script_runs import split_runs  # this script's folder is on sys.path

from epas_lightning.data import TokenDataModule


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.samples: list[list[int]] = []
        self.epoch_batches: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.epoch_batches.append(0)

    def training_step(self, batch, batch_idx):
        self.samples += batch.tolist()
        self.epoch_batches[-1] += 1
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def main(data_dir: str, out_dir: str, second_dir: str | None = None) -> None:
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1 if second_dir is None else 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    mixed = {} if second_dir is None else {"weights": [1, 1], "num_workers": 2, "batch_size": 16}
    dirs = data_dir if second_dir is None else [data_dir, second_dir]
    trainer.fit(model, TokenDataModule(dirs, **{"seq_len": 16, "batch_size": 4, "vocab_size": 512, **mixed}))
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "samples": model.samples}
    record["epoch_batches"] = model.epoch_batches
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main_runs(argv: list[str]) -> None:
    """``main`` for each run in ``argv``, the runs split by ``--then``, after its ``NAME=VALUE`` settings."""
    for run in split_runs(argv):
        while run[0].partition("=")[0].isidentifier() and "=" in run[0]:
            name, _, value = run.pop(0).partition("=")
            os.environ[name] = value
        main(*run)


if __name__ == "__main__":
    main_runs(sys.argv[1:])
