"""Two CPU ranks (DDP, gloo) train one epoch on a prepared dataset; each writes the samples it read.

    python tests/scripts/ddp_data_ranks.py DATA_DIR OUT_DIR     (run by tests/test_prepare.py as a subprocess)

The test starts both ranks at once (as a launcher would); run by hand, Lightning re-launches this script for rank 1.
Either way it must stay a script, never run inside pytest.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from epas_lightning.data import TokenDataModule


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.samples: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.samples += batch.tolist()
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def main(data_dir: str, out_dir: str) -> None:
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out_dir,
    )
    trainer.fit(model, TokenDataModule(data_dir, seq_len=16, batch_size=4, vocab_size=512))
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "samples": model.samples}
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
