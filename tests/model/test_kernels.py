"""Triton kernels of ``fastskip.kernels`` vs the code they replace: ``fastskip.model.blocks``
(``mlp_hidden`` of GPT-2 and Llama style MLPs, ``mlp_out`` plus the residual), as Liger-Kernel
tests each op against the upstream module; and that code vs written-out math.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below),
so the shapes are small. The reference is ``blocks`` with its norm on the kernel's input dtype
(the normalised input rounded to it, as TransformerLens rounds it) and the rest in float64 for
float32 inputs, in float32 for 16-bit ones (rounded once at the end, as the kernels do).
Tolerances (max |kernel - reference| <= atol + rtol * |reference|):

- float32: atol = rtol = 1e-4.
- float16: atol 1e-3, rtol 2e-3 (~2 fp16 ulps; both accumulate in fp32 and round once, so they
  differ by summation order only).
- bfloat16: as float16 with atol 1e-2, rtol 1.6e-2 (~2 bf16 ulps). CUDA only, see BF16_SKIP.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton reads this when triton.language is first imported; fastskip.kernels imports triton
    # only at the first kernel launch, so this works even if an earlier test module imported
    # torch or fastskip. If something imported triton before, REASON below says so and the
    # kernel tests skip (setting the variable in tests/conftest.py avoids that).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastskip import kernels as K  # noqa: E402
from fastskip.model import blocks  # noqa: E402
from fastskip.model.weights import BlockConfig, LayerWeights  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

DEVICE = "cuda" if CUDA else "cpu"
REASON = K.triton_unavailable_reason()
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"Triton kernels cannot run: {REASON}")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
BF16_SKIP = (
    "bfloat16 tl.dot is unsupported in Triton's CPU interpreter: it stores bf16 as uint16 and "
    "its create_dot multiplies the raw bit patterns (results ~1e10; triton-lang/triton#11584, "
    "'we just don't support it yet'); bf16 kernel cases run on CUDA only. The 16-bit code path "
    "is covered on CPU by the float16 cases."
)
# Under the interpreter numpy warns when exp(-2z) overflows to inf in the saturated tail of
# gelu/silu; that is the intended path (u / inf == -0), see test_activations_saturate.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, D, F, (block_m, block_n, block_k) or None for the defaults). Small blocks force ragged
# edges in every dimension and several K iterations; D and F are not powers of two.
SHAPES = [
    (1, 48, 80, None),
    (37, 48, 80, (16, 16, 16)),
    (40, 96, 192, None),
    (17, 100, 200, (16, 32, 32)),
    (33, 64, 128, (32, 64, 64)),
]


def tiles(b: tuple[int, int, int] | None) -> dict[str, int]:
    return {} if b is None else dict(block_m=b[0], block_n=b[1], block_k=b[2])


def make(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=DEVICE)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Kernel output vs reference with the tolerance of ``dtype`` (module docstring)."""
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref.double(), **TOL[dtype])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _config(norm: str, act: str, eps: float) -> BlockConfig:
    return BlockConfig(n_heads=1, n_kv_heads=1, d_head=1, norm=norm, eps=eps, act_fn=act,
                       attn_scale=1.0, rotary_dim=0)


def _layer(**mlp: torch.Tensor | None) -> LayerWeights:
    """A layer with only the MLP weights given (attention and norm weights unused)."""
    none = dict.fromkeys(LayerWeights._fields)
    return LayerWeights(**{**none, **mlp})


def _finish(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return h if dtype == torch.float32 else h.to(dtype)


def hidden_ref(norm: str, act: str, x, w_in, b_in, w_gate=None, normalize=True, eps=1e-5):
    """``blocks.mlp_hidden`` as the kernel computes it (see the module docstring)."""
    cfg, acc = _config(norm, act, eps), _acc(x.dtype)
    xn = blocks.normalize(x, None, None, cfg, normalize).to(acc)
    lw = _layer(W_in=w_in.to(acc), b_in=b_in.to(acc),
                W_gate=None if w_gate is None else w_gate.to(acc))
    return _finish(blocks.mlp_hidden(xn, lw, cfg, apply_ln=False), x.dtype)


def gelu_ref(x, w, b, normalize=True, eps=1e-5):
    """The GPT-2 style MLP's hidden activations: gelu_new(LNPre(x) @ w + b)."""
    return hidden_ref("LNPre", "gelu_new", x, w, b, normalize=normalize, eps=eps)


def swiglu_ref(x, wg, wi, b=None, normalize=True, eps=1e-6):
    """The Llama style MLP's hidden activations: silu(RMSPre(x) @ wg) * (RMSPre(x) @ wi) + b."""
    b = torch.zeros(wi.shape[1], dtype=wi.dtype, device=wi.device) if b is None else b
    return hidden_ref("RMSPre", "silu", x, wi, b, w_gate=wg, normalize=normalize, eps=eps)


def out_ref(h, w, b, r, s=None):
    """resid + scale * blocks.mlp_out(h) (no bias: zeros)."""
    acc = _acc(h.dtype)
    b = torch.zeros(w.shape[1], dtype=acc, device=w.device) if b is None else b.to(acc)
    out = blocks.mlp_out(h.to(acc), _layer(W_out=w.to(acc), b_out=b))
    if s is not None:
        out = s.to(acc)[:, None] * out
    return _finish(r.to(acc) + out, h.dtype)


def skip_bf16_on_cpu(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip(BF16_SKIP)


def gelu_inputs(M: int, D: int, F: int, dtype: torch.dtype):
    return (
        make(M, D, dtype=dtype, scale=2.0, seed=1) + 0.5,
        make(D, F, dtype=dtype, scale=D**-0.5, seed=2),
        make(F, dtype=dtype, scale=0.1, seed=3),
    )


# ---------------------------------------------------------------- the reference vs written-out math


def test_gelu_reference_matches_written_out_formula():
    x, w, b = (t.double().cpu() for t in gelu_inputs(9, 48, 80, torch.float32))
    eps = 1e-5
    xn = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    u = xn @ w + b
    gelu_new = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    # gelu_new is PyTorch's tanh-approximate GELU, an independent implementation of it.
    assert torch.allclose(gelu_new, torch.nn.functional.gelu(u, approximate="tanh"), atol=1e-12)
    # (the norm runs in fp32, so the float64 reference agrees to fp32 round-off)
    torch.testing.assert_close(gelu_ref(x, w, b, eps=eps), gelu_new, atol=1e-5, rtol=1e-5)
    u_raw = x @ w + b
    torch.testing.assert_close(
        gelu_ref(x, w, b, normalize=False), torch.nn.functional.gelu(u_raw, approximate="tanh"),
    )


def test_swiglu_reference_matches_written_out_formula():
    x = make(9, 48, seed=4).double().cpu()
    wg, wi = make(48, 80, seed=5).double().cpu(), make(48, 80, seed=6).double().cpu()
    xn = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    g = xn @ wg
    torch.testing.assert_close(swiglu_ref(x, wg, wi), g * torch.sigmoid(g) * (xn @ wi),
                               atol=1e-5, rtol=1e-5)
    g_raw = x @ wg
    got = swiglu_ref(x, wg, wi, normalize=False)
    torch.testing.assert_close(got, g_raw * torch.sigmoid(g_raw) * (x @ wi))
    # TransformerLens' gated MLP adds b_in after the product: act(x W_gate) * (x W_in) + b_in
    b = make(80, seed=7).double().cpu()
    got = swiglu_ref(x, wg, wi, b, normalize=False)
    torch.testing.assert_close(got, g_raw * torch.sigmoid(g_raw) * (x @ wi) + b)


def test_mlp_out_reference_matches_written_out_formula():
    h, w, b = make(9, 80, seed=7).double(), make(80, 48, seed=8).double(), make(48, seed=9).double()
    r, s = (
        make(9, 48, seed=10).double(),
        torch.linspace(-1, 2, 9, dtype=torch.float64, device=DEVICE),
    )
    torch.testing.assert_close(out_ref(h, w, b, r, s), r + s[:, None] * (h @ w + b))
    torch.testing.assert_close(out_ref(h, w, None, r), r + h @ w)


def test_reference_keeps_dtype_and_rounds_normalised_input_like_transformerlens():
    x, w, b = gelu_inputs(5, 48, 80, torch.float16)
    assert gelu_ref(x, w, b).dtype == torch.float16
    # TransformerLens rounds LNPre(x) to the model dtype before the matmul; so does blocks.
    xf = x.float() - x.float().mean(-1, keepdim=True)
    xn = (xf / (xf.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).half().float()
    u = xn @ w.float() + b.float()
    expected = (0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))).half()
    assert torch.equal(gelu_ref(x, w, b), expected)


# ---------------------------------------------------------------- kernels vs the reference


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D,F,blk", SHAPES)
def test_ln_pre_gelu_kernel(M, D, F, blk, dtype):
    skip_bf16_on_cpu(dtype)
    x, w, b = gelu_inputs(M, D, F, dtype)
    for normalize in (True, False):
        out = K.ln_pre_gelu_mlp_in(x, w, b, normalize=normalize, **tiles(blk))
        check(out, gelu_ref(x, w, b, normalize=normalize), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D,F,blk", SHAPES)
def test_rms_pre_swiglu_kernel(M, D, F, blk, dtype):
    skip_bf16_on_cpu(dtype)
    x = make(M, D, dtype=dtype, scale=3.0, seed=11)
    wg = make(D, F, dtype=dtype, scale=D**-0.5, seed=12)
    wi = make(D, F, dtype=dtype, scale=D**-0.5, seed=13)
    b = make(F, dtype=dtype, scale=0.5, seed=14)
    for normalize in (True, False):
        for bias in (b, None):
            out = K.rms_pre_swiglu_mlp_in(x, wg, wi, bias, normalize=normalize, **tiles(blk))
            ref = swiglu_ref(x, wg, wi, bias, normalize=normalize)
            check(out, ref, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,D,F,blk", SHAPES)
def test_mlp_out_residual_kernel(M, D, F, blk, dtype):
    skip_bf16_on_cpu(dtype)
    h = make(M, F, dtype=dtype, seed=14)
    w = make(F, D, dtype=dtype, scale=F**-0.5, seed=15)
    b, r = make(D, dtype=dtype, scale=0.1, seed=16), make(M, D, dtype=dtype, seed=17)
    scale = torch.linspace(-1.0, 2.0, M, device=DEVICE)  # negative, zero-crossing, > 1
    r_before = r.clone()
    for bias, s in ((b, scale), (None, None), (b, None), (None, scale)):
        out = K.mlp_out_residual(h, w, bias, r, s, **tiles(blk))
        check(out, out_ref(h, w, bias, r, s), dtype)
    assert torch.equal(r, r_before), "resid must not be modified in place"


@needs_triton
def test_mlp_out_scale_none_equals_ones_and_zero_scale_returns_resid():
    h, w, b, r = make(20, 80, seed=1), make(80, 48, seed=2), make(48, seed=3), make(20, 48, seed=4)
    ones = torch.ones(20, device=DEVICE)
    assert torch.equal(K.mlp_out_residual(h, w, b, r), K.mlp_out_residual(h, w, b, r, ones))
    zeros = torch.zeros(20, device=DEVICE)
    assert torch.equal(K.mlp_out_residual(h, w, b, r, zeros), r)


@needs_triton
def test_layernorm_prologue_is_two_pass():
    # A large common offset: E[x^2] - E[x]^2 in fp32 would lose the variance entirely
    # (x^2 ~ 1e8, fp32 ulp 8), while centre-then-square stays accurate.
    x, w, b = gelu_inputs(24, 96, 80, torch.float32)
    x = x + 1e4
    out = K.ln_pre_gelu_mlp_in(x, w, b, block_k=32)
    torch.testing.assert_close(
        out.double(),
        gelu_ref(x, w, b),
        atol=5e-3,
        rtol=0,
    )


@needs_triton
def test_non_contiguous_inputs_are_handled():
    M, D, F = 19, 48, 80
    x = make(D, M, seed=20).T  # column-major view
    w = make(D, 2 * F, seed=21)[:, ::2]  # strided columns
    b = make(2 * F, seed=22)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    ref = gelu_ref(x.contiguous(), w.contiguous(), b.contiguous())
    check(K.ln_pre_gelu_mlp_in(x, w, b), ref, torch.float32)
    ref = swiglu_ref(x.contiguous(), w.contiguous(), w.contiguous())
    check(K.rms_pre_swiglu_mlp_in(x, w, w), ref, torch.float32)
    h, wo, r = make(F, M, seed=23).T, make(D, F, seed=24).T, make(D, M, seed=25).T
    s, bo = make(2 * M, seed=26)[::2], make(2 * D, seed=27)[::2]
    ref = out_ref(h.contiguous(), wo.contiguous(), bo.contiguous(), r.contiguous(), s.contiguous())
    check(K.mlp_out_residual(h, wo, bo, r, s), ref, torch.float32)


@needs_triton
def test_activations_saturate_without_nan():
    # Pre-activations far in both tails: gelu_new -> u or -0, silu -> g or -0, never NaN.
    tails = torch.tensor([-1e3, -80.0, -20.0, -1.0, 0.0, 1.0, 20.0, 80.0, 1e3], device=DEVICE)
    x = tails.repeat(16, 2)[:, :16]  # [16, 16]; with normalize=False, x @ I = x
    eye, zero = torch.eye(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    out = K.ln_pre_gelu_mlp_in(x, eye, zero, normalize=False)
    assert torch.isfinite(out).all()
    check(
        out,
        gelu_ref(x, eye, zero, normalize=False),
        torch.float32,
    )
    out = K.rms_pre_swiglu_mlp_in(x, eye, eye, normalize=False)  # silu(x) * x
    assert torch.isfinite(out).all()
    check(
        out,
        swiglu_ref(x, eye, eye, normalize=False),
        torch.float32,
    )


@needs_triton
def test_empty_batch():
    x, w, b = gelu_inputs(0, 48, 80, torch.float32)
    assert K.ln_pre_gelu_mlp_in(x, w, b).shape == (0, 80)


@needs_triton
def test_bad_arguments_raise_clear_errors(monkeypatch):
    x, w, b = gelu_inputs(4, 48, 80, torch.float32)
    with pytest.raises(ValueError, match="must be 2-D"):
        K.ln_pre_gelu_mlp_in(x[None], w, b)
    with pytest.raises(ValueError, match="w_in has shape"):
        K.ln_pre_gelu_mlp_in(x, w[:40], b)
    with pytest.raises(TypeError, match="dtype"):
        K.ln_pre_gelu_mlp_in(x, w.half(), b)
    with pytest.raises(TypeError, match="not supported"):
        K.rms_pre_swiglu_mlp_in(x.double(), w.double(), w.double())
    with pytest.raises(ValueError, match="resid has shape"):
        K.mlp_out_residual(x, w, None, x)
    with pytest.raises(ValueError, match="powers of two"):
        K.ln_pre_gelu_mlp_in(x, w, b, block_n=24)
    with pytest.raises(ValueError, match="dot_precision"):
        K.mlp_out_residual(x, w, None, x @ w, dot_precision="bf16")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        K.ln_pre_gelu_mlp_in(x.cpu(), w.cpu(), b.cpu())


# ---------------------------------------------------------------- package plumbing


def test_triton_available_agrees_with_reason(monkeypatch):
    assert K.triton_available() == (K.triton_unavailable_reason() is None)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not K.triton_available()
        assert "TRITON_INTERPRET" in K.triton_unavailable_reason()


def test_import_is_cheap_without_triton():
    # A fresh interpreter in which `import triton` fails: the kernels package must import
    # without touching torch or triton and report why.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import kernels as K\n"  # the package on its own (fastskip/__init__ imports torch)
        "assert 'torch' not in sys.modules and 'triton.language' not in sys.modules\n"
        "assert not K.triton_available() and 'not importable' in K.triton_unavailable_reason()\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---------------------------------------------------------------- CUDA only


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["gelu", "swiglu", "out"])
def test_gpt2_small_shapes_on_gpu(op, dtype):
    """GPT-2 small sizes with the default blocks; float32 must be IEEE (TF32 errs ~5e-4)."""
    M, D, F = 300, 768, 3072
    x, w, b = gelu_inputs(M, D, F, dtype)
    if op == "gelu":
        out = K.ln_pre_gelu_mlp_in(x, w, b)
        ref = gelu_ref(x, w, b)
    elif op == "swiglu":
        wi = make(D, F, dtype=dtype, scale=D**-0.5, seed=30)
        out = K.rms_pre_swiglu_mlp_in(x, w, wi)
        ref = swiglu_ref(x, w, wi)
    else:
        h, wo = make(M, F, dtype=dtype, seed=31), make(F, D, dtype=dtype, scale=F**-0.5, seed=32)
        s = torch.rand(M, device=DEVICE)
        out = K.mlp_out_residual(h, wo, b[:D], x, s)
        ref = out_ref(h, wo, b[:D], x, s)
    check(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@needs_triton
def test_row_offsets_past_int32_on_gpu():
    """M * F > 2**31 elements: the row offsets must be computed in int64."""
    M, D, F = 700_000, 64, 3072  # h has 2.15e9 elements (4.3 GB in bf16)
    x, w, b = gelu_inputs(M, D, F, torch.bfloat16)
    h = K.ln_pre_gelu_mlp_in(x, w, b)
    tail = slice(M - 100, M)
    check(h[tail].contiguous(), gelu_ref(x[tail], w, b), torch.bfloat16)
    wo, r = make(F, D, dtype=torch.bfloat16, scale=F**-0.5, seed=40), x
    out = K.mlp_out_residual(h, wo, None, r)
    ref = out_ref(h[tail], wo, None, r[tail])
    check(out[tail].contiguous(), ref, torch.bfloat16)
