"""A llama-family decoder stack driven by our own attention over the model's own weight modules.

We read projections, norms, MLP and rotary parameters from a transformers model but never call its
layer ``forward`` (whose signature changes between 5.x releases); the only module calls are norms,
output projections and the activation, which take one tensor and return one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.kernels.attention_mass import attention_with_lse
from pipeline.kernels.fused import silu_mul


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. q/k/v and gate/up are fused into one matrix each (one GEMM instead of three
    or two); the model's own Linear weights become views into them, so no weight is stored twice."""

    qkv_weight: Tensor
    qkv_bias: Tensor | None
    o: nn.Linear
    attn_norm: nn.Module
    mlp_norm: nn.Module
    gate_up_weight: Tensor
    down: nn.Linear


def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate the weights (and biases) of Linears along the output dim; rebind each as a view."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse projections where only some have a bias")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def _layer_weights(layer: nn.Module) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv_weight, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up_weight, _ = _fuse([mlp.gate_proj, mlp.up_proj])
    return LayerWeights(
        qkv_weight=qkv_weight,
        qkv_bias=qkv_bias,
        o=attn.o_proj,
        attn_norm=layer.input_layernorm,
        mlp_norm=layer.post_attention_layernorm,
        gate_up_weight=gate_up_weight,
        down=mlp.down_proj,
    )


class DecoderStack:
    """Views a transformers causal decoder (``Qwen2Model``/``LlamaModel``-shaped) plus its LM head.

    Shapes: hidden [B, L, D]; per-head tensors [B, H, L, head_dim]; positions [B, L] int64.
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module) -> None:
        cfg = text_model.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the merge engine")
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r}: the engine runs gated SiLU MLPs (silu_mul)")
        self.embed_tokens = text_model.embed_tokens
        self.final_norm = text_model.norm
        self.lm_head = lm_head
        self.layers = [_layer_weights(layer) for layer in text_model.layers]
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.scale = self.head_dim**-0.5
        rotary = text_model.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def kv_bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer's K and V cache."""
        return 2 * self.num_kv_heads * self.head_dim * self.embed_tokens.weight.element_size()

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, L] -> cos, sin [B, 1, L, head_dim] in the model dtype (as transformers computes them)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return cos[:, None], sin[:, None]

    def qkv(
        self, layer: LayerWeights, hidden: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normed hidden [B, L, D] -> rotated q [B, H, L, hd], rotated k and v [B, Hkv, L, hd]."""
        b, n, _ = hidden.shape
        qkv = nn.functional.linear(hidden, layer.qkv_weight, layer.qkv_bias)
        q, k, v = qkv.view(b, n, -1, self.head_dim).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2
        )
        return _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def mlp(self, layer: LayerWeights, hidden: Tensor) -> Tensor:
        """Normed hidden [..., D] -> gated MLP output [..., D]: down(silu(gate) * up)."""
        return layer.down(silu_mul(nn.functional.linear(hidden, layer.gate_up_weight)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
        """Fused attention with grouped KV heads: q [B, H, Lq, hd], k/v [B, Hkv, Lk, hd] -> [B, Lq, H*hd]."""
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self._join_heads(out)

    def attend_with_lse(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Causal attention as ``attend`` plus each query's log-sum-exp [B, H, Lq] fp32, which merge
        layers reuse for the attention mass (``pipeline.kernels.attention_mass.attention_with_lse``)."""
        out, lse = attention_with_lse(q, k, v, scale=self.scale, causal=True)
        return self._join_heads(out), lse

    def _join_heads(self, out: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def logits(self, hidden: Tensor) -> Tensor:
        """Last-layer hidden [B, D] -> logits [B, V] in fp32."""
        return self.lm_head(self.final_norm(hidden)).float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
