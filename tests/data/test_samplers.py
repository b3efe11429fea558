"""ShardSampler and ResumableShuffleSampler: Lightning's orders, exact validation shards, mid-epoch resumes."""

import torch
from torch.utils.data import DistributedSampler, RandomSampler

from dapo_lightning.data import ResumableShuffleSampler, ShardSampler


def test_shard_sampler_covers_every_row_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_several_processes_follow_lightnings_distributed_sampler_and_resume_mid_epoch():
    for rank in range(2):
        ours = ResumableShuffleSampler(10, num_replicas=2, rank=rank, seed=3)
        lightning = DistributedSampler(range(10), num_replicas=2, rank=rank, shuffle=True, seed=3)
        assert list(ours) == list(lightning) and len(list(ours)) == 5
        ours.resume_at(epoch=1, start=2)  # the checkpointed run had consumed 2 of this rank's indices in epoch 1
        lightning.set_epoch(1)
        assert list(ours) == list(lightning)[2:]
        ours.set_epoch(2)
        lightning.set_epoch(2)
        assert list(ours) == list(lightning)  # the next epoch starts at its beginning



def test_an_epoch_offset_serves_the_unfinished_epochs_order_under_lightnings_next_number():
    """Extending a fit that stopped mid-epoch at max_steps: Lightning counts the epoch as finished and numbers the
    continued one 1, the order continues epoch 0, and Lightning's epoch 2 gets the order of epoch 1."""
    for rank in range(2):
        ours = ResumableShuffleSampler(10, num_replicas=2, rank=rank, seed=3)
        lightning = DistributedSampler(range(10), num_replicas=2, rank=rank, shuffle=True, seed=3)
        ours.resume_at(epoch=1, start=2, epoch_offset=1)
        assert ours.order_epoch == 0 and list(ours) == list(lightning)[2:]
        ours.set_epoch(2)
        lightning.set_epoch(1)
        assert list(ours) == list(lightning)

def test_one_process_draws_the_epoch_seed_as_random_sampler_does_and_a_resume_replays_it():
    torch.manual_seed(0)
    ours = ResumableShuffleSampler(10)
    order = list(ours)
    torch.manual_seed(0)
    assert order == list(RandomSampler(range(10)))
    resumed = ResumableShuffleSampler(10)
    resumed.resume_at(epoch=0, start=3, epoch_seed=ours.epoch_seed)  # the seed the checkpoint kept
    torch.manual_seed(123)  # the global generator no longer matters in the resumed epoch
    assert list(resumed) == order[3:] and resumed.epoch_seed == ours.epoch_seed
