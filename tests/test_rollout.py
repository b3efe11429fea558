"""Generation and teacher-forced log-probs on the tiny Qwen2.5-VL."""

import torch
from torch.testing import assert_close

from dapo_lightning.logprobs import completion_logps
from dapo_lightning.rollout import SamplingSettings, TokenIds, completion_mask_from_eos, generate


def test_completion_mask_keeps_tokens_up_to_and_including_the_first_eos():
    eos = (9,)
    ids = torch.tensor([[4, 9, 5, 9], [4, 5, 6, 7], [9, 1, 1, 1]])
    mask, truncated = completion_mask_from_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def _rollout(policy, processor, prompt_batch, G=4, max_new_tokens=6, seed=0):
    torch.manual_seed(seed)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    settings = SamplingSettings(num_generations=G, max_new_tokens=max_new_tokens, temperature=1.0)
    return generate(policy.eval(), prompt_batch, processor.tokenizer, settings, token_ids), token_ids


def test_generate_groups_rows_by_prompt_and_masks_after_eos(policy, processor, prompt_batch):
    rollout, token_ids = _rollout(policy, processor, prompt_batch)
    B, G = len(prompt_batch), 4
    assert rollout.completion_ids.shape[0] == B * G == rollout.num_rows
    assert rollout.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(rollout.completions) == B * G
    # padding after EOS is the pad id and masked out
    assert (rollout.completion_ids[rollout.completion_mask == 0] == token_ids.pad).all()
    lengths = rollout.completion_mask.sum(-1)
    assert ((lengths == 6) | ~rollout.truncated).all()


def test_vision_special_tokens_are_never_sampled(policy, processor, prompt_batch):
    rollout, token_ids = _rollout(policy, processor, prompt_batch, G=8, max_new_tokens=12)
    assert len(token_ids.suppress) == 5
    assert not torch.isin(rollout.completion_ids, torch.tensor(token_ids.suppress)).any()


def test_teacher_forced_logps_equal_the_generators_own(policy, processor, prompt_batch):
    """The log-prob of each sampled token under the logits generate() used (padded batch, mrope positions)."""
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    torch.manual_seed(3)
    policy.eval()
    with torch.no_grad():
        out = policy.generate(
            input_ids=prompt_batch.input_ids, attention_mask=prompt_batch.attention_mask,
            pixel_values=prompt_batch.pixel_values, image_grid_thw=prompt_batch.image_grid_thw,
            mm_token_type_ids=prompt_batch.mm_token_type_ids, do_sample=True, max_new_tokens=5, num_return_sequences=2,
            eos_token_id=list(token_ids.eos), pad_token_id=token_ids.pad, output_logits=True,
            return_dict_in_generate=True, suppress_tokens=list(token_ids.suppress),
        )
    P = prompt_batch.input_ids.shape[1]
    sampled = out.sequences[:, P:]  # [N, T]
    step_logits = torch.stack(out.logits, dim=1)  # [N, T, V] raw logits before any processor
    expected = torch.log_softmax(step_logits.float(), -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    mask, _ = completion_mask_from_eos(sampled, token_ids.eos)

    from dapo_lightning.batch import RolloutBatch

    rollout = RolloutBatch(prompts=prompt_batch, num_generations=2, completion_ids=sampled, completion_mask=mask,
                           completions=[""] * sampled.shape[0])
    with torch.no_grad():
        lp = completion_logps(policy, rollout.model_inputs(list(range(rollout.num_rows))))
    width = lp.logps.shape[1]
    valid = lp.mask.bool()
    assert_close(lp.logps[valid], expected[:, :width][valid], rtol=0, atol=1e-5)


def test_model_inputs_trim_padding_and_keep_each_rows_own_image(policy, processor, prompt_batch):
    rollout, _ = _rollout(policy, processor, prompt_batch)
    rows = [9, 0]  # group 2 then group 0
    inputs = rollout.model_inputs(rows)
    n_patches = prompt_batch.patch_counts
    assert inputs["pixel_values"].shape[0] == n_patches[2] + n_patches[0]
    assert torch.equal(inputs["pixel_values"][: n_patches[2]], prompt_batch.pixel_values[n_patches[0] + n_patches[1]:])
    # no column is padding for every row
    assert inputs["attention_mask"].bool().any(0).all()
    # the completion part is the rows' completions, cut at the longest valid length
    width = int(rollout.completion_mask[rows].sum(-1).max())
    assert torch.equal(inputs["completion_ids"], rollout.completion_ids[rows, :width])
    # per-row log-probs do not depend on which other rows share the forward
    with torch.no_grad():
        together = completion_logps(policy, inputs).logps
        alone = completion_logps(policy, rollout.model_inputs([9])).logps
    n = alone.shape[1]
    assert_close(together[0, :n], alone[0], rtol=0, atol=1e-5)


def test_reward_kwargs_follow_trl_conventions(policy, processor, prompt_batch):
    rollout, _ = _rollout(policy, processor, prompt_batch, G=2)
    kwargs = rollout.reward_kwargs()
    assert kwargs["solution"] == [s for s in prompt_batch.columns["solution"] for _ in range(2)]
    assert kwargs["num_generations"] == 2
    assert [len(ids) for ids in kwargs["completion_ids"]] == rollout.completion_mask.sum(-1).tolist()
    assert len(kwargs["prompts"]) == 6
