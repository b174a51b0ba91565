"""A small Llama-style decoder over event tokens, readable top to bottom.

Order of the file follows the data: config -> RMSNorm -> RoPE -> attention (grouped-query,
optional KV cache) -> SwiGLU feed-forward -> block -> Transformer. Shapes are written as
B batch, T time, D d_model, H query heads, K key/value heads, Dh head dim, V vocab.

Conventions chosen so that export to Hugging Face `LlamaForCausalLM` is a pure rename:
RoPE rotates split halves (`rotate_half`), RMSNorm is computed in float32, no biases,
SwiGLU as `w2(silu(w1 x) * w3 x)`, input and output embeddings tied by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from mega_trading.core.config import PositiveInt, config_dataclass, from_dict
from mega_trading.core.errors import ConfigError

# vocab_size never appears here: it always comes from the tokenizer.
PRESETS: dict[str, dict[str, int]] = {
    # 738,432 hidden params (1.0M with a 2,048 vocab); trains in minutes on 2 CPU cores.
    "micro": {
        "n_layer": 4, "d_model": 128, "n_head": 4,
        "n_kv_head": 2, "ffn_hidden": 352, "block_size": 256,
    },
    # 23,601,664 hidden params (24.6M with a 2,048 vocab).
    "small": {
        "n_layer": 8, "d_model": 512, "n_head": 8,
        "n_kv_head": 4, "ffn_hidden": 1408, "block_size": 512,
    },
    # 225,485,824 hidden params; 227.6M in all with a 2,048-token vocab (see tests).
    "base": {
        "n_layer": 20, "d_model": 1024, "n_head": 16,
        "n_kv_head": 4, "ffn_hidden": 2816, "block_size": 512,
    },
}


@config_dataclass
class ModelConfig:
    vocab_size: PositiveInt
    block_size: PositiveInt = 256
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_kv_head: PositiveInt = 2
    d_model: PositiveInt = 128
    ffn_hidden: PositiveInt = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of "
                             f"n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of "
                             f"n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        if self.dropout != 0.0:
            raise ValueError("dropout is not supported (must be 0)")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
        if "vocab_size" not in overrides:
            raise ConfigError("model preset needs vocab_size (it comes from the tokenizer)")

        return from_dict(cls, {**PRESETS[name], **overrides}, prefix="model.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_groups(self) -> int:
        return self.n_head // self.n_kv_head

    def n_params(self, include_embeddings: bool = True) -> int:
        d, dh = self.d_model, self.head_dim
        attn = d * dh * (2 * self.n_head + 2 * self.n_kv_head)  # q, o + k, v
        mlp = 3 * d * self.ffn_hidden
        hidden = self.n_layer * (attn + mlp + 2 * d) + d  # + two norms per layer, final norm
        if not include_embeddings:
            return hidden
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return hidden + embeddings

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N matmuls + causal attention.

        N = the non-embedding parameters (norm gains too, negligible) + the output
        projection, counted even when tied; the input embedding is a lookup, not a matmul. Attention scores and values cost
        2 * 2 * T * D per layer forward on a full (non-causal) T; causal halves it.
        """
        seq_len = seq_len or self.block_size
        matmul_params = self.n_params(include_embeddings=False) + self.vocab_size * self.d_model
        attention = self.n_layer * 2 * 2 * seq_len * self.d_model // 2
        return 6 * matmul_params + 3 * attention

    def describe(self) -> dict[str, int | float]:
        """Numbers the trainer prints and logs next to the run."""
        return {
            "n_params": self.n_params(),
            "n_params_hidden": self.n_params(include_embeddings=False),
            "flops_per_token": self.flops_per_token(),
            "head_dim": self.head_dim,
            "kv_groups": self.kv_groups,
            "block_size": self.block_size,
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 like HF Llama so exported logits match under bf16 too.
        return F.rms_norm(at_least_float32(x), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is: a float64 model (the tests' reference for float32
    rounding) stays float64 throughout."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, Dh], each frequency repeated over both halves (HF layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, Dh]; cos/sin: [T, Dh]. Rotates pairs (i, i + Dh/2)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    k[layer], v[layer]: [B, K, max_len, Dh]. The caller tracks positions: prefill with
    `start_pos=0`, then feed one token at a time with `start_pos` = tokens seen so far.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if max_len > cfg.block_size:
            raise ConfigError(f"KV cache length {max_len} exceeds block_size {cfg.block_size}")
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.max_len = batch, max_len
        self.writes = 0  # bumped by every write through this class (decode.py mirrors keys)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.writes += 1

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, K, T, Dh] at start_pos; return all keys/values so far."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.max_len}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        self.writes += 1
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def rotate(self, q, k, cos, sin):
        """RoPE on queries and keys; a method so accel.apply_liger can swap in a fused kernel."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def attend(self, q, k, v):
        """Causal attention over a whole window; a method so accel can swap in a kernel."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, Dh]
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, k, cos, sin)
        if cache is None:
            y = self.attend(q, k, v)  # [B, H, T, Dh]
        else:
            k, v = cache.update(self.layer, start_pos, k, v)  # [B, K, start_pos + T, Dh]
            # Query i sits at start_pos + i and sees keys 0..start_pos + i; a lone query
            # sees everything, so it needs no mask.
            mask = None
            if T > 1:
                keys = torch.arange(start_pos + T, device=x.device)
                queries = torch.arange(start_pos, start_pos + T, device=x.device)
                mask = keys[None, :] <= queries[:, None]  # [T, start_pos + T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*Dh]
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start_pos: int = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual output projections shrunk by 1/sqrt(2 n_layer)
        so the residual stream's variance does not grow with depth at init."""
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if param.ndim == 1:
                nn.init.ones_(param)  # norm gains
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                start_pos: int = 0, return_hidden: bool = False) -> torch.Tensor:
        """idx: [B, T] token ids -> float32 logits [B, T, V] (float64 for a float64 model).

        return_hidden=True stops before the output head and returns the final normed hidden
        states [B, T, D], so a fused linear cross-entropy never materializes the logits.
        """
        x = self.norm(self._blocks(idx, cache, start_pos))  # [B, T, D]
        if return_hidden:
            return x
        return at_least_float32(self.output(x))  # [B, T, V]

    def last_logits(self, idx: torch.Tensor, cache: KVCache | None = None,
                    start_pos: int = 0) -> torch.Tensor:
        """`forward(idx, cache, start_pos)[:, -1]` [B, V] without running the output head
        on the other T - 1 positions (a prefill only needs the last token's logits)."""
        x = self._blocks(idx, cache, start_pos)  # [B, T, D]
        return at_least_float32(self.output(self.norm(x[:, -1])))  # [B, V]

    def _blocks(self, idx: torch.Tensor, cache: KVCache | None, start_pos: int) -> torch.Tensor:
        """Embedding and every block: idx [B, T] -> [B, T, D], before the final norm."""
        T = idx.shape[1]
        if start_pos + T > self.rope_cos.shape[0]:
            raise ValueError(f"positions up to {start_pos + T} exceed block_size "
                             f"{self.cfg.block_size}")
        cos = self.rope_cos[start_pos:start_pos + T].to(self.tok_embeddings.weight.dtype)
        sin = self.rope_sin[start_pos:start_pos + T].to(self.tok_embeddings.weight.dtype)
        x = self.tok_embeddings(idx)  # [B, T, D]
        for block in self.layers:
            x = block(x, cos, sin, cache, start_pos)
        return x

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A KV cache on this model's device and dtype (max_len defaults to block_size)."""
        weight = self.tok_embeddings.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.block_size,
                       device=weight.device, dtype=weight.dtype)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimizer roles: 'matrix' = 2-D hidden weights (Muon), 'embedding' = token
        embedding / output head (AdamW), 'norm' = gains (AdamW, no weight decay).
        Every parameter appears in exactly one group (tied weights once)."""
        groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embedding": [], "norm": []}
        for name, param in self.named_parameters():  # yields a tied weight once
            if name.startswith(("tok_embeddings.", "output.")):
                groups["embedding"].append(param)
            elif param.ndim == 2:
                groups["matrix"].append(param)
            else:
                groups["norm"].append(param)
        seen = [id(p) for group in groups.values() for p in group]
        assert len(seen) == len(set(seen)) == len(list(self.parameters())), \
            "every parameter must be in exactly one optimizer group"
        return groups


def config_from_dict(data: dict) -> ModelConfig:
    """Inverse of `mega_trading.core.config.to_dict` for a saved ModelConfig."""

    return from_dict(ModelConfig, data)
