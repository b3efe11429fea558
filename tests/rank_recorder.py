"""A test-only callback for subprocess fits: each rank writes the dataset rows it trained on."""

import json
from pathlib import Path


from dapo_lightning.hooks import RolloutCallback


class RankRecorder(RolloutCallback):
    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.rows: list[int] = []
        self.prompts_per_step: list[int] = []
        self.skipped = 0

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train":
            self.rows.extend(rollout.prompts.index)
            self.prompts_per_step.append(len(rollout.prompts))
            self.skipped += rollout.prompts.num_skipped

    def on_train_end(self, trainer, module):
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"rows": self.rows, "world_size": trainer.world_size, "global_step": trainer.global_step,
                   "prompts_per_step": self.prompts_per_step, "skipped": self.skipped}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
