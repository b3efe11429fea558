"""SPEC 3 modality masks by hand: vision = image pads inside vision brackets; text = the rest, less specials, system."""

import torch

from dapo_lightning.attention import ModalityMasks, SpecialTokens, first_real_position, modality_masks

# Made-up ids: 0 pad, 1 <|im_start|>, 2 <|im_end|>, 3 <|vision_start|>, 4 <|vision_end|>, 5 <|image_pad|>, 10+ words.
SPECIAL = SpecialTokens(image_pad=5, vision_start=3, vision_end=4, im_start=1, im_end=2, not_text=(0, 1, 2, 3, 4))
PAD, IM_START, IM_END, VS, VE, IMG = 0, 1, 2, 3, 4, 5


def _masks(rows: list[list[int]], real: list[list[int]] | None = None) -> ModalityMasks:
    ids = torch.tensor(rows)
    attention = torch.tensor(real) if real is not None else (ids != PAD).long()
    return modality_masks(ids, attention, SPECIAL)


def test_two_images_and_a_system_segment_with_left_padding():
    # 0-1 padding; 2-5 system turn (<|im_start|> "system" "You" <|im_end|>); 6-7 <|im_start|> "user";
    # 8-11 first image (<|vision_start|> pad pad <|vision_end|>); 12 "and"; 13-15 second image (one pad);
    # 16 "Which"; 17 <|im_end|>; 18-19 <|im_start|> "assistant"
    row = [PAD, PAD, IM_START, 10, 11, IM_END, IM_START, 12, VS, IMG, IMG, VE]
    row += [13, VS, IMG, VE, 14, IM_END, IM_START, 15]
    masks = _masks([row])
    # vision: the three image pads, each strictly inside its <|vision_start|> ... <|vision_end|>
    assert masks.vision[0].nonzero().flatten().tolist() == [9, 10, 14]
    # text: "user"(7), "and"(12), "Which"(16), "assistant"(19); the system turn 2..5, padding and specials are not text
    assert masks.text[0].nonzero().flatten().tolist() == [7, 12, 16, 19]
    assert masks.num_text.tolist() == [4] and masks.num_vision.tolist() == [3]
    assert masks.text.shape == masks.vision.shape == (1, 20)  # [n, P]
    assert first_real_position(torch.tensor([[0, 0, 1, 1]])).tolist() == [2]


def test_image_pads_outside_brackets_are_text_and_an_unclosed_bracket_holds_no_vision():
    rows = [
        # an image pad after the bracket closed, then a bracket that never closes
        [IM_START, 10, IM_END, IM_START, 12, VS, IMG, VE, IMG, 13, VS, IMG, 14],
        # no system turn closes: everything from the first <|im_start|> on is the system segment
        [12, 13, VS, IMG, VE, IM_START, 10, 11, 14, 14, 14, 14, 14],
    ]
    masks = _masks(rows)
    assert masks.vision[0].nonzero().flatten().tolist() == [6]
    assert masks.text[0].nonzero().flatten().tolist() == [4, 8, 9, 11, 12]
    assert masks.vision[1].nonzero().flatten().tolist() == [3]
    assert masks.text[1].nonzero().flatten().tolist() == [0, 1]


def test_padding_columns_are_neither_text_nor_vision_even_with_a_real_token_id():
    row = [12, IM_START, 10, IM_END, 13, VS, IMG, VE]
    masks = _masks([row], real=[[0, 1, 1, 1, 1, 1, 1, 1]])  # column 0 is padding although its id is a word
    assert masks.text[0].nonzero().flatten().tolist() == [4]
    assert masks.vision[0].nonzero().flatten().tolist() == [6]


def test_special_tokens_from_the_qwen_tokenizer_and_a_two_image_prompt(processor):
    from PIL import Image

    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    vocab = processor.tokenizer.get_vocab()
    assert special.image_pad == vocab["<|image_pad|>"]
    assert set(special.not_text) == {
        vocab[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
    }
    messages = [
        {"role": "system", "content": "You are a helpful assistant ."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Which image is red ?"},
                {"type": "image"},
                {"type": "text", "text": "A : red B : blue"},
            ],
        },
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")]
    encoded = processor(text=[text], images=images, return_tensors="pt")
    masks = modality_masks(encoded["input_ids"], encoded["attention_mask"], special)
    # the tiny processor gives 4 image tokens per 56x56 image
    assert masks.num_vision.tolist() == [8]
    # user(1) + "Which image is red ?"(5) + "A : red B : blue"(6) + assistant(1); the system turn is excluded
    assert masks.num_text.tolist() == [13]


def test_key_sets_drop_padding_and_the_sink_from_every_set():
    from dapo_lightning.attention import key_sets

    # 0 padding; 1 <|im_start|> = the sink (first real token); 2 "sys"; 3 <|im_end|>; 4 <|im_start|>; 5 "user";
    # 6 <|vision_start|>; 7 image pad; 8 <|vision_end|>; 9 "Which"
    row = [PAD, IM_START, 10, IM_END, IM_START, 12, VS, IMG, VE, 13]
    keys = key_sets(torch.tensor([row]), torch.tensor([[0] + [1] * 9]), SPECIAL)
    assert keys.indicators.shape == (1, 10, 3)  # [n, P, 3]
    kept, text, vision = keys.indicators[0].T.tolist()
    assert kept == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]  # not the padding column 0, not the sink column 1
    assert text == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # "user", "Which" (the system turn 1..3 is not text)
    assert vision == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert keys.num_text.tolist() == [2] and keys.num_vision.tolist() == [1]
