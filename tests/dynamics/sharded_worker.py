"""One process of ``test_sharded.py``: the tiny policy sharded with torch's FSDP2 (``fully_shard``) over 2 CPU
processes (gloo), each process's rows finishing at a different step.

Lightning's ``FSDPStrategy`` refuses the CPU, and torch's FSDP1 needs an accelerator; FSDP2 shards on the CPU, so the
project's passes run here on a sharded policy as they would inside a fit: every forward is a collective (each decoder
layer and vision block gathers its parameters), and a process that made fewer forwards than the other would hang.
Each pass is also run on an unsharded copy of the same weights, alone, without lockstep: the sharded results must be
those. Written to ``OUT/rank<r>.json``; the test reads them.

    python -m torch.distributed.run --nproc_per_node 2 tests/dynamics/sharded_worker.py OUT MODEL_DIR PARQUET
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

EOS_STEP = {0: 0, 1: 3}  # the step at which every row of a process samples EOS: widths 1 and 4
MAX_NEW_TOKENS = 6


class ForwardCounter:
    def __init__(self, module):
        self.count = 0
        module.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def force_eos_in_decoder(eos: int, step: int):
    """``rollout.sample_next``, except that from ``step`` on every row samples EOS (counted per call)."""
    import dapo_lightning.rollout as rollout

    original = rollout.sample_next
    calls = [0]

    def sample_next(logits, settings, suppress, seen=None):
        token = original(logits, settings, suppress, seen)
        calls[0] += 1
        return torch.full_like(token, eos) if calls[0] - 1 >= step else token

    rollout.sample_next = sample_next
    return lambda: calls.__setitem__(0, 0)


def force_eos_in_generate(model, eos: int, step: int, prompt_width: int):
    """``model.generate`` with a logits processor that leaves only EOS from completion token ``step`` on."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceEOS(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - prompt_width >= step:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, eos] = 0.0
            return scores

    original = model.generate
    model.generate = lambda **kwargs: original(**kwargs, logits_processor=LogitsProcessorList([ForceEOS()]))


def main(out: str, model_dir: str, parquet: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from datasets import Dataset
    from torch.distributed.fsdp import fully_shard
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

    from dapo_lightning.actor import Actor
    from dapo_lightning.config import PolicyConfig, RolloutConfig
    from dapo_lightning.data import example_prompt_batch
    from dapo_lightning.logprobs import completion_logps_shared
    from dapo_lightning.models import export_pretrained, gather_full_state_dict, load_policy, load_processor
    from dapo_lightning.rollout import SamplingSettings, TokenIds, generate_hf, generate_shared
    from dapo_lightning.update import _zero_loss

    result: dict = {"rank": rank}
    processor = load_processor(model_dir)
    torch.manual_seed(0)  # the same perturbed weights on every process: a trained policy, not the base model
    policy = load_policy(model_dir).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    alone = copy.deepcopy(policy)  # unsharded, run by this process alone, without lockstep
    for module in policy.modules():
        if isinstance(module, (Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock)):
            fully_shard(module)
    fully_shard(policy)
    holder = torch.nn.Module()  # the LightningModule's place: the policy is its submodule
    holder.policy = policy
    result["sharded"] = [type(p).__name__ for p in policy.parameters()][:1]
    forwards, alone_forwards = ForwardCounter(policy), ForwardCounter(alone)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    eos = token_ids.eos[0]
    rows = Dataset.from_parquet(parquet).to_list()
    prompts = example_prompt_batch(processor, rows[2 * rank: 2 * rank + 2], system_prompt=None)  # 2 prompts x G 2
    settings = SamplingSettings(num_generations=2, max_new_tokens=MAX_NEW_TOKENS)

    # --- the shared-prompt decoder: rows finish at step 0 here, step 3 there
    reset = force_eos_in_decoder(eos, EOS_STEP[rank])
    decode_steps = []
    torch.manual_seed(10 + rank)
    rollout = generate_shared(policy, prompts, processor.tokenizer, settings, token_ids, lockstep=True,
                              on_decode_step=lambda t, mask: decode_steps.append(t))
    result["shared_forwards"] = forwards.take()
    result["shared_decode_steps"] = decode_steps
    result["shared_width"] = rollout.completion_ids.shape[1]
    reset()
    torch.manual_seed(10 + rank)
    # lean_decode off: the count is of model forwards (the lean step, which this unsharded copy would take, makes none)
    alone_rollout = generate_shared(alone, prompts, processor.tokenizer, settings, token_ids, lean_decode=False)
    result["alone_forwards"] = alone_forwards.take()  # what each process would make without lockstep
    reset()
    result["shared_same_as_alone"] = torch.equal(rollout.completion_ids, alone_rollout.completion_ids)

    # --- transformers' generate (synced_gpus)
    force_eos_in_generate(policy, eos, EOS_STEP[rank], prompts.input_ids.shape[1])
    force_eos_in_generate(alone, eos, EOS_STEP[rank], prompts.input_ids.shape[1])
    torch.manual_seed(20 + rank)
    hf = generate_hf(policy, prompts, processor.tokenizer, settings, token_ids, lockstep=True)
    result["hf_forwards"] = forwards.take()
    result["hf_width"] = hf.completion_ids.shape[1]
    torch.manual_seed(20 + rank)
    hf_alone = generate_hf(alone, prompts, processor.tokenizer, settings, token_ids)
    result["hf_same_as_alone"] = torch.equal(hf.completion_ids, hf_alone.completion_ids)

    # --- the log-prob forward and backward: completions of 1 token here, of 4 there
    rows_all = list(range(rollout.num_rows))
    logps = completion_logps_shared(policy, rollout, rows_all, lockstep=True)
    logps.logps.sum().backward()
    result["logps_forwards"] = forwards.take()
    expected = completion_logps_shared(alone, rollout, rows_all)
    result["logps_same_as_alone"] = bool(torch.allclose(logps.logps, expected.logps, atol=1e-6))
    expected.logps.sum().backward()
    result["grads_same_as_alone"] = same_gradients(policy, alone, world)

    # --- the update's padding micro-batch (a zero loss) here, a real one there
    policy.zero_grad(set_to_none=True)
    alone.zero_grad(set_to_none=True)
    host = type("Host", (), {"lockstep": True, "completion_logps": staticmethod(
        lambda rollout, rows, width=None, with_entropy=False: completion_logps_shared(
            policy, rollout, rows, width=width, lockstep=True))})()
    if rank == 0:
        _zero_loss(host, rollout).backward()
    else:
        completion_logps_shared(policy, rollout, rows_all, lockstep=True).logps.sum().backward()
        completion_logps_shared(alone, rollout, rows_all).logps.sum().backward()
    result["padding_forwards"] = forwards.take()
    result["padding_grads_same_as_alone"] = same_gradients(policy, alone, world)

    # --- the teacher-forced pass: 1 micro-batch here, 2 there
    actor = Actor(policy, None, processor, PolicyConfig(model_name_or_path=model_dir),
                  RolloutConfig(num_generations=2, max_completion_length=MAX_NEW_TOKENS))
    actor.lockstep = True
    chunks = [rows_all] if rank == 0 else [rows_all[:2], rows_all[2:]]
    actor.teacher_forced(rollout, chunks, [], old=True, reference=False)
    result["teacher_forced_forwards"] = forwards.take()
    alone_actor = Actor(alone, None, processor, PolicyConfig(model_name_or_path=model_dir),
                        RolloutConfig(num_generations=2, max_completion_length=MAX_NEW_TOKENS))
    old = rollout.old_logps
    alone_actor.teacher_forced(rollout, chunks, [], old=True, reference=False)
    result["teacher_forced_same_as_alone"] = bool(torch.allclose(old, rollout.old_logps, atol=1e-6))

    # --- the end-of-fit export: full parameters gathered to rank 0, which writes
    full = gather_full_state_dict(holder, policy)
    result["gathered_keys"] = len(full)
    if rank == 0:
        export_pretrained(policy, processor, Path(out) / "export", state_dict=full)
        loaded = load_policy(str(Path(out) / "export")).state_dict()
        reference = alone.state_dict()
        result["export_same_as_alone"] = sorted(loaded) == sorted(reference) and all(
            torch.equal(loaded[k], reference[k]) for k in reference)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # FSDP2 with gloo aborts in the interpreter's exit ("terminate called without an active exception")


def same_gradients(sharded, alone, world: int) -> bool:
    """The sharded policy's gradients (FSDP2 averages over processes) equal the unsharded copies' gradients averaged
    over the processes."""
    expected = dict(alone.named_parameters())
    same = True
    for name, p in sharded.named_parameters():
        want = expected[name].grad
        want = torch.zeros_like(expected[name]) if want is None else want.clone()
        dist.all_reduce(want)
        got = p.grad.full_tensor() if p.grad is not None else torch.zeros_like(want)
        same &= bool(torch.allclose(got, want / world, atol=1e-6, rtol=1e-5))
    return same


if __name__ == "__main__":
    main(*sys.argv[1:4])
