"""Stacked weights: a TransformerLens model's parameters copied once into
tensors with a leading layer axis, on the runner's device and dtype.

A forward is then a loop over plain tensors: no hooks, no modules, and no
per-call weight copies (TransformerLens re-copies ``W_U.T`` on every forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeVar, cast

import torch

from ..errors import UnsupportedModelError
from .architecture import Architecture, architecture_of

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Norm = Literal["LN", "LNPre", "RMS", "RMSPre"]


class BlockConfig(NamedTuple):
    """The static numbers of a block (the same for every layer)."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    norm: Norm
    eps: float
    act_fn: str
    attn_scale: float
    rotary_dim: int  # 0 = learned absolute positions


class LayerWeights(NamedTuple):
    """The weights of the blocks. In ``StackedWeights.layers`` every tensor has a
    leading layer axis; ``StackedWeights.layer(L)`` gives layer L's views (the
    same fields without that axis). Shapes per layer (H query heads, K key/value
    heads, dh = d_head, F = d_mlp):

    W_Q [d, H*dh], b_Q [H*dh], W_KV [d, 2*K*dh] (keys then values), b_KV
    [2*K*dh], W_O [H*dh, d], b_O [d], W_in [d, F], b_in [F], W_gate [d, F]
    (gated MLPs only), W_out [F, d], b_out [d], ln1_w/ln1_b/ln2_w/ln2_b [d]
    (only for norms that keep weights: LN, RMS).
    """

    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_KV: torch.Tensor
    b_KV: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_in: torch.Tensor
    b_in: torch.Tensor
    W_gate: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor
    ln1_w: torch.Tensor | None
    ln1_b: torch.Tensor | None
    ln2_w: torch.Tensor | None
    ln2_b: torch.Tensor | None


class Rotary(NamedTuple):
    """Rotary tables [n_ctx, rotary_dim] (the same for every layer)."""

    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class StackedWeights:
    """A model's weights for the fast path: the blocks stacked along a leading
    layer axis (``layers``), the embeddings W_E [V_in, d] / W_pos [n_ctx, d], the
    final norm's weights lnf_w/lnf_b [d] (None when folded) and the unembedding
    W_U [d, V], b_U [V]."""

    arch: Architecture
    config: BlockConfig
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    layers: LayerWeights
    rotary: Rotary | None
    lnf_w: torch.Tensor | None
    lnf_b: torch.Tensor | None
    W_U: torch.Tensor
    b_U: torch.Tensor
    _views: list[LayerWeights] | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def layer(self, L: int) -> LayerWeights:
        """Views of layer ``L``'s weights (made once: a step reads them without indexing)."""
        if self._views is None:
            self._views = [LayerWeights._make(None if t is None else t[i] for t in self.layers)
                           for i in range(self.n_layers)]
        return self._views[L]

    # the block's numbers, by name
    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.config.n_kv_heads

    @property
    def d_head(self) -> int:
        return self.config.d_head

    @property
    def norm(self) -> Norm:
        return self.config.norm

    @property
    def act_fn(self) -> str:
        return self.config.act_fn

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (SwiGLU-style, with ``W_gate``)."""
        return self.layers.W_gate is not None

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every weight tensor by name (``layers.W_Q``, ``W_U``, ...)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value
            elif isinstance(value, (LayerWeights, Rotary)):
                out.update({f"{f.name}.{k}": t for k, t in value._asdict().items()
                            if isinstance(t, torch.Tensor)})
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def flops_per_token(self) -> dict[str, int]:
        """Multiply-add FLOPs (x2) per token of one attention, one MLP, one unembed."""
        d, hd, kd = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        mlp_mats = 3 if self.gated else 2
        return {
            "attn": 2 * d * (2 * hd + 2 * kd),
            "mlp": 2 * d * self.d_mlp * mlp_mats,
            "unembed": 2 * d * self.d_vocab_out,
        }


V = TypeVar("V")


def _required(value: V | None, name: str) -> V:
    """A config value the architecture needs (TransformerLens types it optional)."""
    if value is None:
        raise UnsupportedModelError(f"the model's config has no {name}")
    return value


def _param(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name in sd:
        return sd[name]
    raise UnsupportedModelError(f"the model has no parameter '{name}' (unexpected layout)")


def _from_slot_one(t: torch.Tensor) -> torch.Tensor:
    """``t`` [L, ...] copied into slots 1..L of an [L + 1, ...] tensor and viewed from
    there: every layer's view then starts at a storage offset >= 2, so the compiled
    steps (``fastskip.model.ops``), to which the offset is a symbolic size, never
    specialise a graph for layer 0's offset 0. (One layer of memory per tensor.)"""
    out = t.new_empty((t.shape[0] + 1, *t.shape[1:]))
    out[1:] = t
    return out[1:]


def stack_weights(model: HookedTransformer, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> StackedWeights:
    """Copy a HookedTransformer's weights into a ``StackedWeights``."""
    cfg = model.cfg
    arch = architecture_of(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    L, H, dh, d = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model
    K = cfg.n_key_value_heads or H
    d_mlp = _required(cfg.d_mlp, "d_mlp")
    device = torch.device(device) if device is not None else sd["embed.W_E"].device
    dtype = dtype or sd["embed.W_E"].dtype

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def per_layer(fmt: str) -> list[torch.Tensor]:
        return [_param(sd, fmt.format(i)) for i in range(L)]

    def optional(fmt: str) -> torch.Tensor | None:
        """Layer-stacked parameter, or None where the model has none (e.g. folded norms)."""
        return put(torch.stack(per_layer(fmt))) if fmt.format(0) in sd else None

    def bias(fmt: str, n: int) -> torch.Tensor:
        """Layer-stacked bias, zeros [L, n] where the model has none."""
        stacked = optional(fmt)
        return stacked if stacked is not None else put(torch.zeros(L, n))

    def kv(which: str, kind: str) -> list[torch.Tensor]:
        """Key/value weights or biases; grouped-query models store them as ``_W_K``."""
        plain = f"blocks.{{}}.attn.{kind}_{which}"
        return per_layer(plain if plain.format(0) in sd else f"blocks.{{}}.attn._{kind}_{which}")

    heads_to_cols = lambda w: w.permute(1, 0, 2).reshape(d, -1)  # noqa: E731  [h,d,dh]->[d,h*dh]
    W_KV = [torch.cat([heads_to_cols(k), heads_to_cols(v)], dim=1)
            for k, v in zip(kv("K", "W"), kv("V", "W"), strict=True)]
    b_KV = [torch.cat([k.reshape(-1), v.reshape(-1)])
            for k, v in zip(kv("K", "b"), kv("V", "b"), strict=True)]
    layers = LayerWeights(
        W_Q=put(torch.stack([heads_to_cols(w) for w in per_layer("blocks.{}.attn.W_Q")])),
        b_Q=put(torch.stack([b.reshape(-1) for b in per_layer("blocks.{}.attn.b_Q")])),
        W_KV=put(torch.stack(W_KV)), b_KV=put(torch.stack(b_KV)),
        W_O=put(torch.stack([w.reshape(H * dh, d) for w in per_layer("blocks.{}.attn.W_O")])),
        b_O=put(torch.stack(per_layer("blocks.{}.attn.b_O"))),
        W_in=put(torch.stack(per_layer("blocks.{}.mlp.W_in"))),
        b_in=bias("blocks.{}.mlp.b_in", d_mlp),
        W_gate=optional("blocks.{}.mlp.W_gate"),
        W_out=put(torch.stack(per_layer("blocks.{}.mlp.W_out"))),
        b_out=bias("blocks.{}.mlp.b_out", d),
        ln1_w=optional("blocks.{}.ln1.w"), ln1_b=optional("blocks.{}.ln1.b"),
        ln2_w=optional("blocks.{}.ln2.w"), ln2_b=optional("blocks.{}.ln2.b"),
    )
    layers = LayerWeights._make(None if t is None else _from_slot_one(t) for t in layers)
    rotary = None
    if arch == "llama":
        attn0 = model.blocks[0].attn
        rotary = Rotary(put(attn0.rotary_cos), put(attn0.rotary_sin))
    config = BlockConfig(
        n_heads=H, n_kv_heads=K, d_head=dh, eps=float(cfg.eps),
        norm=cast(Norm, cfg.normalization_type),  # one of Norm: checked by architecture_of
        act_fn=_required(cfg.act_fn, "act_fn"), attn_scale=float(model.blocks[0].attn.attn_scale),
        rotary_dim=int(_required(cfg.rotary_dim, "rotary_dim")) if rotary is not None else 0)
    w_pos = sd.get("pos_embed.W_pos")
    return StackedWeights(
        arch=arch, config=config, n_layers=L, d_model=d, d_mlp=d_mlp, d_vocab=cfg.d_vocab,
        d_vocab_out=cfg.d_vocab_out, n_ctx=cfg.n_ctx,
        W_E=put(sd["embed.W_E"]), W_pos=put(w_pos) if w_pos is not None else None,
        layers=layers, rotary=rotary,
        lnf_w=put(sd["ln_final.w"]) if "ln_final.w" in sd else None,
        lnf_b=put(sd["ln_final.b"]) if "ln_final.b" in sd else None,
        W_U=put(sd["unembed.W_U"]),
        b_U=put(sd["unembed.b_U"]) if "unembed.b_U" in sd else put(torch.zeros(cfg.d_vocab_out)),
    )
