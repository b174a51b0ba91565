"""The sampler's fast path: one decode step of `model.Transformer` on fused weights.

A decode step of a small model feeds one token per rollout, [B, 1], and is bound by per-op
overhead and by reading the KV cache, not by arithmetic. Outside autograd and in float32,
`decode_step` runs the same maths as `Transformer.forward(token, cache, pos)[:, -1]` in
under half the ops, on [B, D] rows and on weights fused once per weight version
(`DecodeWeights`):

* q, k, v and the rotate_half of q and k come out of one matmul, so RoPE is one multiply
  and one multiply-add;
* gate and up projections are one matmul;
* each RMSNorm gain is folded into the matmul that follows it, and the norm itself is a
  per-row scale computed in four tiny ops (`_inv_rms`) where `F.rms_norm` takes ten;
* each residual add happens inside its output matmul (`addmm`);
* grouped-query attention treats the G query heads that share a key/value head as G rows
  of one query: two batched matmuls, no repeated keys, no mask (a lone query sees every
  cached key).

On CPU in float32, where the C kernel builds (`kernels/decode_step.c`), the whole step
through every layer and the head is ONE call on the same fused weights transposed to
[in, out]: no per-op overhead, activations kept in cache, and the keys read from a second
copy in transposed tiles of 16 (`TransposedKeys`, rebuilt whenever the plain forward wrote
the cache). bench/generate.py: ~3.6x Hugging Face `generate` (BENCHMARKS.md). Otherwise
the same maths runs as ~20 PyTorch ops a layer, below.

Anything else (autograd, another dtype, several tokens per row, another model class)
takes the model's plain forward. The fused weights live beside the model (never in its
state_dict) and are rebuilt whenever a parameter changes: an optimizer step bumps a
tensor's version, a checkpoint load changes its storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mega_trading.model import kernels
from mega_trading.model.transformer import KVCache, Transformer


@dataclass(frozen=True)
class FusedLayer:
    """One block's weights, [out, in] like nn.Linear's (the same gemm layout as the plain
    forward, so the two round alike)."""

    qkv: torch.Tensor  # rows: q, k, rotate_half(q), rotate_half(k), v; attention gain in
    wo: torch.Tensor
    w13: torch.Tensor  # rows: gate (w1), up (w3); ffn gain folded in
    w2: torch.Tensor


@dataclass(frozen=True)
class NativeWeights:
    """The fused weights transposed to [in, out] for `kernels.decode_layers` (one C call
    runs every layer of a step on CPU): the tensors, kept alive, and their C pointer arrays
    (wqkv, wo, w13, w2)."""

    tensors: tuple[torch.Tensor, ...]
    pointers: tuple
    head: torch.Tensor  # [D, V rounded up to 16], final norm gain folded in, zero padding


@dataclass(frozen=True)
class DecodeWeights:
    key: tuple  # (data_ptr, version) of every parameter they were built from
    layers: tuple[FusedLayer, ...]
    output: torch.Tensor  # final norm gain folded in
    native: NativeWeights | None = None  # float32 on CPU, where the C kernel builds

    @classmethod
    @torch.no_grad()
    def build(cls, model: Transformer, key: tuple) -> DecodeWeights:
        def rotated(weight: torch.Tensor, heads: int) -> torch.Tensor:
            # rotate_half on a projection's outputs = the same on its weight rows.
            first, second = weight.view(heads, 2, -1, weight.shape[-1]).unbind(1)
            return torch.stack([-second, first], 1).view_as(weight)

        cfg, layers = model.cfg, []
        for block in model.layers:
            attn, ffn = block.attention, block.feed_forward
            qk = torch.cat([attn.wq.weight, attn.wk.weight])  # [(H + K) Dh, D]
            qkv = torch.cat([qk, rotated(qk, cfg.n_head + cfg.n_kv_head), attn.wv.weight])
            w13 = torch.cat([ffn.w1.weight, ffn.w3.weight])
            layers.append(FusedLayer(
                qkv=qkv * block.attention_norm.weight,
                wo=attn.wo.weight,
                w13=w13 * block.ffn_norm.weight,
                w2=ffn.w2.weight))
        output = model.output.weight * model.norm.weight
        return cls(key, tuple(layers), output, _native_weights(cfg, layers, output))


def native_decode_supported(cfg) -> bool:
    """Shapes decode_step.c takes: rows of 16 floats, at most 8 query heads a KV head."""
    return (cfg.head_dim % 16 == 0 and cfg.head_dim <= 128 and cfg.d_model % 16 == 0
            and cfg.ffn_hidden % 16 == 0 and cfg.n_head // cfg.n_kv_head <= 8)


def _native_weights(cfg, layers: list[FusedLayer], output: torch.Tensor) -> NativeWeights | None:
    if output.device.type != "cpu" or output.dtype != torch.float32:
        return None
    if not native_decode_supported(cfg) or kernels.decode_kernel_error() is not None:
        return None
    by_kind = [[getattr(layer, kind).t().contiguous() for layer in layers]
               for kind in ("qkv", "wo", "w13", "w2")]
    vocab = output.shape[0]
    head = F.pad(output.t(), (0, -vocab % 16)).contiguous()  # [D, V padded]
    return NativeWeights(tuple(w for kind in by_kind for w in kind),
                         tuple(kernels.pointer_array(kind) for kind in by_kind), head)


@dataclass
class TransposedKeys:
    """The cache's keys again, in transposed tiles of 16 keys, [layers, B, K, tiles, Dh,
    16], for the C step's score products. In step with cache.k for `length` positions
    while cache.writes is `writes`: the plain forward (prefill, a slid window) and the
    PyTorch step bump it, the C step writes both copies itself."""

    kt: torch.Tensor
    length: int = 0
    writes: int = -1


def _transposed_keys(cache: KVCache, pos: int) -> torch.Tensor:
    """cache's transposed keys, valid for positions 0..pos-1 (rebuilt when stale)."""
    mirror = cache.__dict__.get("_transposed_keys")
    layers, batch, heads, length, dim = cache.k.shape
    if mirror is None:
        kt = torch.zeros(layers, batch, heads, -(-length // 16), dim, 16)
        mirror = cache.__dict__["_transposed_keys"] = TransposedKeys(kt)
    if mirror.length != pos or mirror.writes != cache.writes:
        tiles = -(-pos // 16)
        keys = F.pad(cache.k[:, :, :, :pos], (0, 0, 0, tiles * 16 - pos))
        mirror.kt[:, :, :, :tiles] = keys.view(layers, batch, heads, tiles, 16, dim).transpose(-1, -2)
        mirror.writes = cache.writes
    mirror.length = pos + 1  # the C step writes position pos into both
    return mirror.kt


def clear_cache(cache: KVCache) -> None:
    """Zero a cache and its transposed key copy for reuse: the state of a new cache, without
    allocating one (a new 16-row cache of the micro model faults in ~12 MB of fresh pages,
    ~3 ms; zeroing it takes ~0.3 ms)."""
    cache.reset()
    mirror = cache.__dict__.get("_transposed_keys")
    if mirror is not None:
        mirror.kt.zero_()
        mirror.length, mirror.writes = 0, -1


def decode_weights(model: Transformer) -> DecodeWeights:
    """The model's fused decode weights, rebuilt whenever a parameter changed."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get("_fused_decode")
    if cached is None or cached.key != key:
        cached = DecodeWeights.build(model, key)
        model.__dict__["_fused_decode"] = cached  # a plain attribute: never in state_dict
    return cached


def decode_step(model, token: torch.Tensor, cache: KVCache, pos: int,
                weights: DecodeWeights | None = None) -> torch.Tensor:
    """`model(token, cache=cache, start_pos=pos)[:, -1]` for token [B, 1] -> logits [B, V],
    writing the token's keys and values into the cache at pos. `weights`: the model's
    `decode_weights`, when the caller knows the parameters have not changed since (a
    sampling loop), which saves looking at every parameter each step."""
    if not isinstance(model, Transformer) or not _fusable(model, token):
        return model(token, cache=cache, start_pos=pos)[:, -1]
    cfg = model.cfg
    if not 0 <= pos < min(cache.max_len, cfg.block_size):
        raise ValueError(f"position {pos} outside the cache ({cache.max_len}) or "
                         f"block_size ({cfg.block_size})")
    fused = weights or decode_weights(model)
    x = F.embedding(token[:, 0], model.tok_embeddings.weight)  # [B, D]
    if fused.native is not None and _native_cache(cache, cfg, token.shape[0]):
        return _native_step(model, fused.native, x, cache, pos)
    return _pytorch_step(model, fused, x, cache, pos)


def _native_step(model: Transformer, native: NativeWeights, x: torch.Tensor, cache: KVCache,
                 pos: int) -> torch.Tensor:
    """Every layer and the head in one call of kernels/decode_step.c."""
    cfg = model.cfg
    dims = (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden)
    logits = kernels.decode_layers(x, native.pointers, dims, model.rope_cos[pos].contiguous(),
                                   model.rope_sin[pos].contiguous(), cache.k, cache.v,
                                   _transposed_keys(cache, pos), pos, cfg.norm_eps,
                                   native.head)
    return logits[:, :cfg.vocab_size]


def _pytorch_step(model: Transformer, fused: DecodeWeights, x: torch.Tensor, cache: KVCache,
                  pos: int) -> torch.Tensor:
    cfg = model.cfg
    B, H, K, Dh = x.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
    n_qk = (H + K) * Dh
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # [Dh]
    scale = Dh ** -0.5
    cache.writes += 1  # the transposed key copy of the C step is stale from here
    for layer, w in enumerate(fused.layers):
        y = F.linear(x * _inv_rms(x, cfg.norm_eps), w.qkv)
        qk = y[:, :n_qk].view(B, H + K, Dh) * cos  # RoPE: x cos + rotate_half(x) sin
        qk.addcmul_(y[:, n_qk:2 * n_qk].view(B, H + K, Dh), sin)
        cache.k[layer, :, :, pos] = qk[:, H:]
        cache.v[layer, :, :, pos] = y[:, 2 * n_qk:].view(B, K, Dh)
        # Reading the cache is most of a decode step, and these two batched matmuls read
        # it ~1.4x faster than SDPA's CPU kernel (BENCHMARKS.md); they round a little
        # differently from the full forward's SDPA (~1e-5 on the logits).
        keys = cache.k[layer, :, :, :pos + 1].flatten(0, 1)  # [B*K, L, Dh]
        values = cache.v[layer, :, :, :pos + 1].flatten(0, 1)
        query = qk[:, :H].reshape(B * K, H // K, Dh) * scale  # [B*K, G, Dh]
        scores = torch.bmm(query, keys.transpose(1, 2))  # [B*K, G, L]
        att = torch.bmm(torch.softmax(scores, dim=-1), values)  # [B*K, G, Dh]
        x = torch.addmm(x, att.view(B, H * Dh), w.wo.t())
        gate_up = F.linear(x * _inv_rms(x, cfg.norm_eps), w.w13)
        hidden = F.silu(gate_up[:, :cfg.ffn_hidden]).mul_(gate_up[:, cfg.ffn_hidden:])
        x = torch.addmm(x, hidden, w.w2.t())
    return F.linear(x * _inv_rms(x, cfg.norm_eps), fused.output)


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) per row of x [B, D] -> [B, 1]: RMSNorm without its gain,
    as sqrt(D) / sqrt(||x||^2 + D eps)."""
    dim = x.shape[-1]
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return norm.square_().add_(dim * eps).rsqrt_().mul_(dim ** 0.5)


def _native_cache(cache: KVCache, cfg, batch: int) -> bool:
    return (cache.k.dtype == torch.float32 and cache.k.device.type == "cpu"
            and cache.k.is_contiguous() and cache.v.is_contiguous()
            and tuple(cache.k.shape[:3]) == (cfg.n_layer, batch, cfg.n_kv_head))


def _fusable(model: Transformer, token: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled()
            and model.tok_embeddings.weight.dtype == torch.float32
            and token.ndim == 2 and token.shape[1] == 1)
