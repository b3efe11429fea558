"""A lean decode step for the shared-prompt decoder: the text decoder's arithmetic without its module calls.

``rollout.generate_shared`` feeds one token per row per step. Through the model's forward that
is, per step and layer, separate q/k/v and gate/up projections, the rotary embedding and the
attention mask rebuilt, some 15 module calls, and attention over a cache that holds each
prompt's keys and values once per row; at the sizes this project trains on a CPU it is per-call
overhead, not arithmetic (``docs/performance.md``). :class:`LeanDecoder` runs the same
arithmetic from the language model's own weights:

- q/k/v as one matrix product with the three biases, gate/up as one (fused once per rollout;
  a peft LoRA projection is fused as ``W + scaling * B @ A``, its forward in eval mode);
- the rotary cos/sin of every decode position of the rollout computed once (a decode token's
  multimodal rotary position has equal t/h/w components, so it is the 1-D rotary embedding),
  the prompt's padding bias once;
- a static cache: each prompt's keys and values once per group (the prefill's), each row's
  completion keys and values written into a preallocated buffer;
- shared-prefix attention (``attention/shared_prefix.py``): the group's prompt keys read once
  per step, not G times.

It samples what the model's forward samples: the same logits up to float rounding
(``tests/test_lean_decode.py``). Recognised: Qwen2.5-VL and Qwen2-VL text decoders (exact module
classes, SiLU MLP, default rotary type, full attention, plain or LoRA-wrapped ``nn.Linear``
projections, no module hooks, unsharded parameters, eval mode); :func:`lean_decoder_weights`
returns None for anything else and the decoder calls the model. It also returns None while an
attention recorder is installed (``attention.capture.KernelHook``: capture during decoding):
the recorded attention statistics are then those of the model's own kernels, bit for bit (the
lean step's float rounding would move them in the last digits, and the run logs print them in
full). ``model.rollout.lean_decode`` turns it off.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapo_lightning.attention.capture import decoder_attention_modules, hooked_recorder
from dapo_lightning.attention.shared_prefix import padding_bias, shared_prefix_attention

# transformers module -> (text model, decoder layer, attention, MLP, RMS norm, rotary embedding) class names
_KNOWN = {
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl": (
        "Qwen2_5_VLTextModel", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLAttention", "Qwen2MLP", "Qwen2_5_VLRMSNorm",
        "Qwen2_5_VLRotaryEmbedding"),
    "transformers.models.qwen2_vl.modeling_qwen2_vl": (
        "Qwen2VLTextModel", "Qwen2VLDecoderLayer", "Qwen2VLAttention", "Qwen2MLP", "Qwen2VLRMSNorm",
        "Qwen2VLRotaryEmbedding"),
}
_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class LayerWeights:
    """One decoder layer's weights, fused for the step (``[out, in]`` as ``nn.Linear`` keeps them)."""

    input_norm: Tensor  # [D]
    qkv: Tensor  # [(H + 2 Hkv) d, D]: q, k, v projections stacked
    qkv_bias: Tensor  # [(H + 2 Hkv) d]
    out: Tensor  # [D, H d]
    post_norm: Tensor  # [D]
    gate_up: Tensor  # [2 I, D]: gate, up stacked
    down: Tensor  # [D, I]


@dataclass
class LeanWeights:
    """Everything the step reads, fused once per rollout."""

    embed: Tensor  # [V, D]
    layers: list[LayerWeights]
    norm: Tensor  # [D]
    lm_head: Tensor  # [V, D]
    eps: float
    inv_freq: Tensor  # [d / 2] float32
    rope_scaling: float  # the rotary embedding's attention_scaling
    num_heads: int  # H
    num_kv_heads: int  # Hkv
    head_dim: int  # d
    scale: float  # the attention modules' scaling


def lean_decoder_weights(model: nn.Module) -> LeanWeights | None:
    """The fused weights of ``model``'s text decoder, or None when it is not one :class:`LeanDecoder` knows."""
    top = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = getattr(getattr(top, "model", None), "language_model", None)
    classes = _KNOWN.get(type(text).__module__)
    if classes is None or type(text).__name__ != classes[0] or model.training:
        return None
    module = importlib.import_module(type(text).__module__)
    text_cls, layer_cls, attention_cls, mlp_cls, norm_cls, rotary_cls = (getattr(module, name) for name in classes)
    config = text.config
    rope = getattr(config, "rope_parameters", None) or {}
    if (type(text.rotary_emb) is not rotary_cls or rope.get("rope_type", "default") != "default"
            or config.hidden_act != "silu" or any(t != "full_attention" for t in config.layer_types)
            or config._attn_implementation not in _KERNELS or type(text.embed_tokens) is not nn.Embedding
            or type(text.norm) is not norm_cls or _has_hooks(text) or _has_hooks(top.lm_head)
            or any(_sharded(p) for p in text.parameters())
            or any(hooked_recorder(m) is not None for m in decoder_attention_modules(top))):
        return None
    layers = []
    for layer in text.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (type(layer) is not layer_cls or type(attn) is not attention_cls or type(mlp) is not mlp_cls
                or type(layer.input_layernorm) is not norm_cls or type(layer.post_attention_layernorm) is not norm_cls
                or attn.sliding_window is not None):
            return None
        projections = [_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                            mlp.up_proj, mlp.down_proj)]
        if any(p is None for p in projections):
            return None
        (q, q_bias), (k, k_bias), (v, v_bias), (o, o_bias), (gate, _), (up, _), (down, down_bias) = projections
        if q_bias is None or k_bias is None or v_bias is None or o_bias is not None or down_bias is not None:
            return None
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight, qkv=torch.cat([q, k, v]), qkv_bias=torch.cat([q_bias, k_bias, v_bias]),
            out=o, post_norm=layer.post_attention_layernorm.weight, gate_up=torch.cat([gate, up]), down=down,
        ))
    head = _linear(top.lm_head)
    if head is None or head[1] is not None:
        return None
    eps = {layer.input_layernorm.variance_epsilon for layer in text.layers}
    eps |= {layer.post_attention_layernorm.variance_epsilon for layer in text.layers} | {text.norm.variance_epsilon}
    attention = text.layers[0].self_attn
    if len(eps) != 1 or len({layer.self_attn.scaling for layer in text.layers}) != 1:
        return None
    return LeanWeights(
        embed=text.embed_tokens.weight, layers=layers, norm=text.norm.weight, lm_head=head[0], eps=eps.pop(),
        inv_freq=text.rotary_emb.inv_freq.float(), rope_scaling=float(text.rotary_emb.attention_scaling),
        num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=attention.head_dim,
        scale=float(attention.scaling),
    )


def _linear(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of a plain ``nn.Linear``, or of a peft LoRA ``Linear`` with its active adapters folded in."""
    if type(module) is nn.Linear:
        return (None, None) if _has_hooks(module) else (module.weight, module.bias)
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear or _has_hooks(module):
        return None
    base = module.base_layer
    if module.disable_adapters or module.merged:  # the forward is the base layer's (merged: the delta is in it)
        return base.weight, base.bias
    weight = base.weight
    for adapter in module.active_adapters:
        if adapter not in module.lora_A.keys():
            continue
        if (adapter in module.lora_variant or module.lora_B[adapter].bias is not None
                or (module.training and module.lora_dropout[adapter].p > 0)):
            return None  # DoRA and other variants, LoRA biases: their forward is not W x + s B A x
        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)  # [out, in]
    return weight, base.bias


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks anywhere below ``module`` (ZeRO-3's gathers, profilers): the lean step would skip them."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _sharded(parameter: Tensor) -> bool:
    """A parameter that is a shard (DeepSpeed ZeRO-3, FSDP's DTensor), not the whole tensor."""
    return hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor" or parameter.numel() == 0


def _normalized(x: Tensor, constants: tuple[Tensor, Tensor]) -> Tensor:
    """``_rms_norm`` without its weight, for float32 ``x``: ``mean`` is ``sum`` then ``div_``; D and eps as 0-d tensors
    of ``x``'s dtype (the values the kernels cast Python scalars to, without the casts' copies). [n, D]"""
    width, eps = constants
    return x * x.pow(2).sum(-1, keepdim=True).div_(width).add_(eps).rsqrt_()


def _packed_linear(weight: Tensor, rows: int):
    """``x @ weight.T + bias`` as a function of (x, weight, bias), with ``weight`` [out, in] prepacked for oneDNN.

    At a decode step's few rows MKL's GEMM costs about twice oneDNN's on prepacked weights (``docs/performance.md``).
    None where oneDNN's linear is unavailable or fails on the CPU (other builds, other torch versions).
    """
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        torch.ops.mkldnn._linear_pointwise(weight.new_zeros(rows, weight.shape[1]), packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return packed


def _dnnl_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _addmm_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``Qwen2_5_VLRMSNorm``'s arithmetic (float32 statistics, the weight applied in the input dtype). [n, D]"""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LeanDecoder:
    """Decode steps for the N = B * G rows of one rollout, from the prefill's cache of the B prompts.

    Args:
        weights: :func:`lean_decoder_weights` of the policy.
        prompt_cache: the prefill's cache (``transformers`` ``Cache``): per layer keys/values [B, Hkv, P, d].
        prompt_mask: [B, P] the prompts' attention mask (left padding 0).
        next_position: [B] each prompt's rotary position of its first completion token.
        repeats: G, rows per prompt (row b * G + g holds prompt b, as ``repeat_interleave`` orders them).
        steps: the most tokens :meth:`step` will be fed (the decoder's max_new_tokens - 1).
        fast: run :meth:`_step_fast` (None: in float32 and float64, see below).

    In float32 (the CPU dtype) the step runs :meth:`_step_fast`, the same arithmetic in fewer, larger kernels
    (at the CPU benchmark's sizes a kernel costs about what its arithmetic does, ``docs/performance.md``):

    - each RMS norm's weight folded into the projection after it (``W diag(w)``), the attention scale into the
      queries' rotary factors (for a power-of-two scale, as at head size 64 or 16, exactly what scaling the scores does);
    - each head's q/k channels reordered so the two rotary halves interleave (channel j next to j + d/2: the
      prompt's cached keys reordered alike once per rollout; a dot product does not depend on the order), so the
      rotary embedding is one complex product per step instead of four kernels;
    - the prompt's keys and values repeated for the query heads that share them (once per rollout, not per row),
      so no query is copied into a grouped layout; each row's completion keys and values in one buffer, written
      with one copy per step; the prompt's padding bias only where a prompt has padding (adding 0 changes nothing).

    Other dtypes (bfloat16 on a GPU) run :meth:`_step_general`, the unfolded step (folding a weight into another
    would round it to 8 bits once more).
    """

    def __init__(self, weights: LeanWeights, prompt_cache, prompt_mask: Tensor, next_position: Tensor, repeats: int,
                 steps: int, fast: bool | None = None):
        w = self.weights = weights
        B, P = prompt_mask.shape
        G, Hkv, d = repeats, w.num_kv_heads, w.head_dim
        self.B, self.G, self.P, self.N = B, G, P, B * G
        steps = max(steps, 1)
        dtype = w.embed.dtype
        device = prompt_mask.device
        # rotary angles of every decode position, [steps, N, d / 2]: step t of row r sits at next_position + t
        positions = next_position.repeat_interleave(G).to(device)[None, :] + torch.arange(steps, device=device)[:, None]
        freqs = positions[..., None].float() * w.inv_freq.to(device)  # [steps, N, d / 2]
        self.fast = dtype in (torch.float32, torch.float64) if fast is None else fast
        if self.fast:
            self._init_fast(prompt_cache, prompt_mask, freqs, steps)
            return
        angles = torch.cat([freqs, freqs], dim=-1)  # [steps, N, d]
        self.cos = (angles.cos() * w.rope_scaling).to(dtype).unsqueeze(2)  # [steps, N, 1, d]
        half = d // 2
        sin = (angles.sin() * w.rope_scaling).to(dtype)
        # rotate_half(x) * sin == flip(x halves) * [-sin_1, sin_2]
        self.sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)  # [steps, N, 1, d]
        bias = padding_bias(prompt_mask, dtype)  # [B, P]
        self.prefix_bias = bias.view(B, 1, 1, 1, P)  # [B, 1(Hkv), 1(G), 1(R), P]
        self.layers = []  # per layer: the group's prompt keys/values once, each row's completion keys in a buffer
        for index in range(len(w.layers)):
            keys, values = prompt_cache.layers[index].keys, prompt_cache.layers[index].values  # [B, Hkv, P, d]
            self.layers.append({"prefix_key": keys, "prefix_value": values,
                                "suffix_key": keys.new_zeros(B, Hkv, G, steps, d),  # [B, Hkv, G, steps, d]
                                "suffix_value": values.new_zeros(B, Hkv, G, steps, d)})

    def _init_fast(self, prompt_cache, prompt_mask: Tensor, freqs: Tensor, steps: int) -> None:
        """:meth:`_step_fast`'s weights, rotary factors and caches (see the class docstring)."""
        w = self.weights
        B, P, N = self.B, self.P, self.N
        H, Hkv, d = w.num_heads, w.num_kv_heads, w.head_dim
        rep, half = H // Hkv, d // 2
        device = prompt_mask.device
        # channel order of a rotated head: (0, d/2, 1, d/2 + 1, ...), each rotary pair adjacent (a complex number)
        pairs = torch.arange(d, device=device).view(2, half).t().reshape(d)  # [d]
        heads = (torch.arange(H + Hkv, device=device) * d)[:, None]
        order = torch.cat([(heads + pairs).reshape(-1), torch.arange((H + Hkv) * d, (H + 2 * Hkv) * d, device=device)])
        # rotary factors (cos + i sin) * attention_scaling as the model computes them; the queries' times the scale
        cos, sin = freqs.cos() * w.rope_scaling, freqs.sin() * w.rope_scaling  # [steps, N, d / 2] float32
        self.rotate_key = torch.complex(cos, sin).unsqueeze(2)  # [steps, N, 1, d / 2]
        self.rotate_query = torch.complex(cos * w.scale, sin * w.scale).unsqueeze(2)
        if w.embed.dtype == torch.float64:
            self.rotate_key, self.rotate_query = self.rotate_key.to(torch.complex128), self.rotate_query.to(torch.complex128)
        bias = padding_bias(prompt_mask, w.embed.dtype)  # [B, P]
        self.bias = bias.view(B, 1, 1, P) if bool((prompt_mask == 0).any()) else None  # [B, 1(G), 1(H), P]
        self.norm_constants = (torch.tensor(float(w.embed.shape[1]), dtype=w.embed.dtype, device=device),
                               torch.tensor(w.eps, dtype=w.embed.dtype, device=device))  # D, eps (Python scalars cast)
        self.fast_layers = []
        dnnl = (device.type == "cpu" and w.embed.dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and _packed_linear(w.layers[0].down, N) is not None)
        self.linear = _dnnl_linear if dnnl else _addmm_linear
        prepare = (lambda weight: _packed_linear(weight, N)) if dnnl else (lambda weight: weight.t())
        for layer, cached in zip(w.layers, prompt_cache.layers):
            # the prompt once per group, for each query head (rotated channel order): [B, H, d, P], [B, H, P, d]
            prefix_key_t = cached.keys[..., pairs].repeat_interleave(rep, dim=1).transpose(-1, -2)
            prefix_value = cached.values.repeat_interleave(rep, dim=1)
            self.fast_layers.append((
                prepare((layer.qkv * layer.input_norm)[order]), layer.qkv_bias[order],  # [(H + 2 Hkv) d, D] and bias
                layer.out.t(), prepare(layer.gate_up * layer.post_norm), prepare(layer.down),  # [H d, D], [2 I, D], [D, I]
                prefix_key_t, prefix_value, prefix_value.new_zeros(2, N, Hkv, steps, d),  # completions' keys, values
            ))
        self.head = (w.lm_head * w.norm).t()  # [D, V]

    @torch.no_grad()
    def step(self, token: Tensor, t: int) -> Tensor:
        """Feed completion token ``t`` of every row ([N] ids); the next-token logits. -> [N, V]"""
        if self.fast:
            with torch.inference_mode():
                return self._step_fast(token, t)
        return self._step_general(token, t)

    def _step_fast(self, token: Tensor, t: int) -> Tensor:
        """:meth:`step` in float32: folded weights, complex rotary, one score tensor per layer. -> [N, V]"""
        w = self.weights
        B, G, N, P = self.B, self.G, self.N, self.P
        H, Hkv, d = w.num_heads, w.num_kv_heads, w.head_dim
        rep, half = H // Hkv, d // 2
        rotate_query, rotate_key, bias = self.rotate_query[t], self.rotate_key[t], self.bias  # [N, 1, d / 2]
        linear, constants, S = self.linear, self.norm_constants, t + 1
        hidden = F.embedding(token, w.embed)  # [N, D]
        for qkv_w, qkv_b, out_w, gate_up_w, down_w, prefix_key_t, prefix_value, completion in self.fast_layers:
            qkv = linear(_normalized(hidden, constants), qkv_w, qkv_b)  # RMS norm (weight folded), q/k/v [N, (H + 2 Hkv) d]
            query = torch.view_as_real(torch.view_as_complex(qkv[:, : H * d].view(N, H, half, 2)) * rotate_query)
            torch.view_as_complex(qkv[:, H * d : (H + Hkv) * d].view(N, Hkv, half, 2)).mul_(rotate_key)  # keys rotated
            completion[:, :, :, t] = qkv[:, H * d :].view(N, 2, Hkv, d).transpose(0, 1)  # this step's keys, values
            query = query.view(N * Hkv, rep, d)  # rotated and scaled, contiguous
            keys, values = completion[0].view(N * Hkv, -1, d)[:, :S], completion[1].view(N * Hkv, -1, d)[:, :S]
            # shared-prefix attention: the group's prompt keys once for its G rows, each row's own completion keys
            scores = torch.cat([
                torch.matmul(query.view(B, G, H, d).transpose(1, 2), prefix_key_t).transpose(1, 2),  # [B, G, H, P]
                torch.bmm(query, keys.transpose(1, 2)).view(B, G, H, S),  # [N Hkv, rep, S] -> [B, G, H, S]
            ], dim=-1)  # [B, G, H, P + S]
            if bias is not None:
                scores[..., :P] += bias
            probs = torch.softmax(scores, dim=-1)  # [B, G, H, P + S]
            attended = torch.bmm(probs[..., P:].view(N * Hkv, rep, S), values).view(B, G, H, d)
            attended.add_(torch.matmul(probs[..., :P].transpose(1, 2), prefix_value).transpose(1, 2))  # [B, G, H, d]
            hidden = torch.addmm(hidden, attended.view(N, H * d), out_w)  # residual + o_proj, [N, D]
            gate_up = linear(_normalized(hidden, constants), gate_up_w, None)  # [N, 2 I]
            inner = gate_up.shape[1] // 2
            hidden = linear(F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:]), down_w, None).add_(hidden)  # [N, D]
        return torch.mm(_normalized(hidden, constants), self.head)  # [N, V]

    def _step_general(self, token: Tensor, t: int) -> Tensor:
        """:meth:`step` in any dtype: the model's arithmetic with fused projections. -> [N, V]"""
        w = self.weights
        B, G, N = self.B, self.G, self.N
        H, Hkv, d = w.num_heads, w.num_kv_heads, w.head_dim
        rep = H // Hkv
        cos, sin = self.cos[t], self.sin_signed[t]  # [N, 1, d]
        hidden = F.embedding(token, w.embed)  # [N, D]
        for layer, state in zip(w.layers, self.layers):
            x = _rms_norm(hidden, layer.input_norm, w.eps)  # [N, D]
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # [N, (H + 2 Hkv) d]
            qk = qkv[:, : (H + Hkv) * d].view(N, H + Hkv, d)
            qk = qk * cos + qk.view(N, H + Hkv, 2, d // 2).flip(2).view(N, H + Hkv, d) * sin  # rotary, [N, H + Hkv, d]
            query, key = qk[:, :H], qk[:, H:]  # [N, H, d], [N, Hkv, d]
            value = qkv[:, (H + Hkv) * d :].view(N, Hkv, d)  # [N, Hkv, d]
            suffix_key, suffix_value = state["suffix_key"], state["suffix_value"]  # [B, Hkv, G, steps, d]
            suffix_key[:, :, :, t] = key.view(B, G, Hkv, d).transpose(1, 2)
            suffix_value[:, :, :, t] = value.view(B, G, Hkv, d).transpose(1, 2)
            out = shared_prefix_attention(
                query.view(B, G, Hkv, rep, d).transpose(1, 2), state["prefix_key"], state["prefix_value"],
                self.prefix_bias, suffix_key[:, :, :, : t + 1], suffix_value[:, :, :, : t + 1], None, w.scale,
            )  # [B, Hkv, G, rep, d]
            attended = out.transpose(1, 2).reshape(N, H * d)  # [N, H d]
            hidden = torch.addmm(hidden, attended, layer.out.t())  # residual + o_proj, [N, D]
            x = _rms_norm(hidden, layer.post_norm, w.eps)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)  # [N, I] each
            hidden = torch.addmm(hidden, F.silu(gate) * up, layer.down.t())  # residual + down_proj, [N, D]
        return F.linear(_rms_norm(hidden, w.norm, w.eps), w.lm_head)  # [N, V]
