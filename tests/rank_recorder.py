"""A test-only callback for subprocess fits: each rank writes the dataset rows it trained on."""

import json
from pathlib import Path

from lightning.pytorch import Callback


class RankRecorder(Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.rows: list[int] = []

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train":
            self.rows.extend(rollout.prompts.index)

    def on_train_end(self, trainer, module):
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"rows": self.rows, "world_size": trainer.world_size, "global_step": trainer.global_step}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
