"""Random projections, FAVOR+ feature maps, and the block plumbing shared by the FAVOR Functions.

Every feature phi(x) factors as f * exp(r): f (.., F) bounded, r a per-row log-scale. Query log-scales
cancel in the normaliser D^-1, so queries use f alone; keys are scaled by exp(-g), g a maximum of r, so no
exponent is ever positive and no epsilon is needed (the performer-pytorch defect, docs/paper_notes.md section 5).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Literal

import torch

from .. import cpu_kernels

Kernel = Literal["softmax", "relu", "trig"]
KERNELS: tuple[str, ...] = ("softmax", "relu", "trig")
RELU_EPS = 1e-3  # part of the authors' generalized ReLU kernel phi(x) = relu(x) + 1e-3, not a stabiliser
PAD_LOG_SCALE = torch.finfo(torch.float32).min / 4  # padded keys: never raises a maximum, differences stay finite
PAD_OFFSET = 1e30  # padded keys' features exp(logit - PAD_OFFSET) = 0; finite, so 0 * offset stays 0 in a product
LOG2E = 1 / math.log(2)  # exp(x) = exp2(x log2(e)): torch's CPU exp2 runs about 3x faster than its exp


def orthogonal_gaussian_matrix(
    m: int,
    d: int,
    *,
    orthogonal: bool = True,
    scaling: Literal["chi", "sqrt_d"] = "chi",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """An (m, d) matrix of random projection rows for FAVOR+.

    orthogonal=True stacks blocks of d orthogonal rows (QR with the sign of diag(R) folded in: Haar), else IID
    Gaussian rows; scaling="chi" gives Gaussian row norms, "sqrt_d" sets them all to sqrt(d). Drawn on the CPU
    in float64 from `generator`: a pure function of its seed, the same on every data-parallel rank.
    """
    if m < 1 or d < 1:
        raise ValueError(f"need m >= 1 and d >= 1, got m={m}, d={d}")
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt_d', not {scaling!r}")
    opts = {"generator": generator, "dtype": torch.float64}
    if orthogonal:
        blocks = []
        for _ in range(math.ceil(m / d)):
            q, r = torch.linalg.qr(torch.randn(d, d, **opts))
            blocks.append((q * torch.sign(torch.diagonal(r))).T)  # orthonormal rows, Haar-distributed
        w = torch.cat(blocks)[:m]  # (m, d)
        if scaling == "chi":
            norms = torch.randn(m, d, **opts).norm(dim=1)
        else:
            norms = torch.full((m,), math.sqrt(d), dtype=torch.float64)
        w = w * norms[:, None]
    else:
        w = torch.randn(m, d, **opts)
        if scaling == "sqrt_d":
            w = w * (math.sqrt(d) / w.norm(dim=1, keepdim=True))
    return w.to(device=device, dtype=dtype or torch.get_default_dtype())


def check_feature_args(d: int, projection: torch.Tensor | None, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if projection is None and kernel != "relu":
        raise ValueError(f"kernel {kernel!r} needs a projection matrix")
    if projection is not None and d != projection.shape[1]:
        raise ValueError(f"projection has d={projection.shape[1]} columns but q/k have d_head={d}")


def whole_features(x: torch.Tensor, w: torch.Tensor | None, kernel: Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, r) with phi(x) = f exp(r) for a whole sequence x (B, H, L, d), in plain autograd (trig, matrices).

    softmax: f = exp(W x' - max), r = max - |x'|^2/2 - log sqrt(m), x' = x d^-1/4 (the max is detached);
    trig: f = [cos W x', sin W x'], r = |x'|^2/2 - log sqrt(m); relu: f = m^-1/2 relu(W x) + eps (or relu(x) + eps
    without a projection), r = 0.
    """
    if kernel == "relu":
        f = torch.relu(x) if w is None else torch.relu(x @ w.T) * w.shape[0] ** -0.5
        return f + RELU_EPS, x.new_zeros(x.shape[:-1])
    m, d = w.shape
    x = x * d**-0.25
    wx = x @ w.T  # (B, H, L, m)
    half_sq_norm, log_sqrt_m = 0.5 * (x * x).sum(-1), 0.5 * math.log(m)
    if kernel == "trig":
        return torch.cat([torch.cos(wx), torch.sin(wx)], -1), half_sq_norm - log_sqrt_m
    top = wx.detach().amax(-1, keepdim=True)
    return torch.exp(wx - top), top[..., 0] - half_sq_norm - log_sqrt_m


def mm(a: torch.Tensor, b: torch.Tensor, low: torch.dtype | None = None, out: torch.Tensor | None = None):
    """a @ b; with low=torch.bfloat16 the product of bf16 operands (fp32 accumulation; operands already in bf16 are
    used as they are, others converted), returned in bf16 or written into `out` (any dtype)."""
    if low is None:
        return torch.matmul(a, b, out=out)
    a, b = a.to(low), b.to(low)
    if out is not None and out.dtype == low:
        return torch.matmul(a, b, out=out)
    y = torch.matmul(a, b)
    return y if out is None else out.copy_(y)


def as_low(x: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
    """x as a bf16 product operand (a copy, when low is set and x is not bf16), for an operand that several products
    read: converted once instead of in every product."""
    return x if low is None else x.to(low)


class BlockFeatures:
    """Softmax or ReLU features of one block of rows (B, H, C, d), written in place into a reused (B, H, C, m)
    buffer (no (B, H, L, m) tensor: see favor.py). Queries: f up to a per-row factor; keys: phi(k) exp(-g) with
    g (B, H, C) or (B, H, 1) chosen by the caller. w=None (relu only): the deterministic relu(x) + eps, m = d.
    The *_backward_ methods take G = d loss / d phi and overwrite it.

    `low`: the dtype of the products (mm). The buffers are float32 (or float64) whatever x's dtype: on the CPU an
    elementwise op or a reduction over bf16 or mixed dtypes runs several times slower than over float32, a
    conversion does not. The exception is bf16 products on the CPU with the fused kernels (cpu_kernels.py): the
    buffers are bf16 (buffer_dtype), the products write their logits into them, and one kernel pass turns those
    into features in place, where the float32 route takes five passes. Each method follows its buffer's dtype.
    With low = bf16 the projection is converted once here, not in every product.
    """

    def __init__(self, w: torch.Tensor | None, kernel: Kernel, d: int, low: torch.dtype | None = None):
        self.softmax = kernel == "softmax"
        self.m = d if w is None else w.shape[0]
        # softmax: W x' with x' = x d^-1/4; relu: m^-1/2 relu(W x) = relu(m^-1/2 W x). Either way x @ (s W)^T.
        self.scale = d**-0.25 if self.softmax else self.m**-0.5
        self.w = None if w is None else as_low(w * self.scale, low)  # (m, d), for the gradients
        # softmax logits in base 2 (W x' log2(e)): the features are then exp2 of them, the faster exponential.
        # Row maxima and shifts of the logits are in the same unit; the log-scales r and g stay natural. Kept as
        # (d, m), the transposed view the products read.
        self.w_exp_t = None if w is None else as_low(w * (self.scale * (LOG2E if self.softmax else 1.0)), low).T
        self.log_sqrt_m = 0.5 * math.log(self.m)
        self.low = low

    def buffer_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of feature buffers for operands like x: bf16 for bf16 products where the fused CPU kernels run,
        else float32 (float64 for float64 x)."""
        fused = self.low == torch.bfloat16 and cpu_kernels.fused_for(x) is not None  # the Functions' x: bf16 then
        return torch.bfloat16 if fused else acc_dtype(x)

    @functools.cached_property
    def w_shift_t(self) -> torch.Tensor:
        """[W_exp, 1]^T (d + 1, m), the transposed view of an (m, d + 1) matrix as W_exp^T is: backward's
        recomputation folds a known per-row shift into the product, [x, -shift] @ [W_exp, 1]^T (built on first use:
        a decoding step never needs it)."""
        return torch.cat([self.w_exp_t.T, self.w_exp_t.new_ones(self.m, 1)], 1).T

    def _logits(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.w_exp_t is None:
            return out.copy_(x)
        # a block of rows of (B, H, L, d) is strided: one copy makes it contiguous, and the product is then one
        # (B H C, d) x (d, m) matrix product (matmul would otherwise copy the block and the projection for bmm)
        return mm(x.contiguous(), self.w_exp_t, self.low, out=out)  # (B, H, C, m)

    def queries_(self, x: torch.Tensor, out: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """out <- f(x): exp(W x' - row max) (the base-2 row maxima also into shift (B, H, C)), or m^-1/2 relu(W x) +
        eps."""
        self._logits(x, out)
        if not self.softmax:
            return _relu_features_(out)
        shift = out.new_empty(out.shape[:-1], dtype=acc_dtype(out)) if shift is None else shift
        return _exp2_rows_(out, shift, find_max=True)

    def queries_at_(self, x: torch.Tensor, out: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """out <- queries_'s features again from its row maxima: one product and exp, no pass for the maximum."""
        if not self.softmax:
            return self.queries_(x, out)
        return self._shifted_exp_(x, shift, out)

    def _shifted_exp_(self, x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out <- exp2(x W_exp^T - shift) for x (B, H, C, d) and a base-2 shift (B, H, C): the shift folded into the
        product, except for bf16 products, where it would be rounded to bf16 (subtracted in float32 instead)."""
        if self.low is not None:
            return _exp2_rows_(self._logits(x, out), shift, find_max=False)
        return mm(torch.cat([x, -shift[..., None]], -1), self.w_shift_t, out=out).exp2_()

    def key_logits(self, x: torch.Tensor, out: torch.Tensor, real: torch.Tensor | None, half_sq_norm=None):
        """out <- W x' (base 2 for softmax); returns (r, half_sq_norm) (B, H, C): r = max (W x') - |x'|^2/2
        (PAD_LOG_SCALE for padded keys), or (None, None) for relu (nothing to stabilise). half_sq_norm: the rows'
        |x'|^2/2 where the caller has them (half_sq_norm of the whole sequence, once), else computed here."""
        self._logits(x, out)
        if not self.softmax:
            return None, None
        half_sq_norm = self.half_sq_norm(x) if half_sq_norm is None else half_sq_norm
        r = _row_maxima(out).div_(LOG2E).sub_(half_sq_norm)
        if real is not None:
            r.masked_fill_(~real, PAD_LOG_SCALE)
        return r, half_sq_norm

    def half_sq_norm(self, x: torch.Tensor) -> torch.Tensor:
        """|x'|^2 / 2 (B, H, L) for softmax keys x (B, H, L, d), summed in float32 (bf16 x: its products are exact in
        float32). The Functions compute it for the whole sequence at once (four operators, not four per block)
        and keep it for backward."""
        x = x.to(acc_dtype(x))
        return torch.sum(x * x, -1).mul_(0.5 * self.scale**2)

    def keys_(self, logits: torch.Tensor, half_sq_norm, g, real: torch.Tensor | None) -> torch.Tensor:
        """logits (from key_logits) <- phi(k) exp(-g), in place; padded keys get 0."""
        if self.softmax:
            return _exp2_rows_(logits, self.key_offset(half_sq_norm, g, real), find_max=False)
        _relu_features_(logits)
        return logits if real is None else logits.mul_(real[..., None])

    def key_offset(self, half_sq_norm, g, real):
        """The base-2 shift of the key logits (B, H, C): (|x'|^2/2 + g + log sqrt(m)) log2(e), PAD_OFFSET for
        padded keys. Backward, where g is known, computes it once for the whole sequence."""
        offset = (half_sq_norm + g + self.log_sqrt_m).mul_(LOG2E)
        return offset if real is None else offset.masked_fill_(~real, PAD_OFFSET)  # exp2(-PAD_OFFSET) = 0

    def keys_at_(self, x: torch.Tensor, out: torch.Tensor, offset, real: torch.Tensor | None) -> torch.Tensor:
        """out <- phi(k) exp(-g) again (backward's recomputation) from the rows' key_offset (softmax; relu: None,
        the padded keys from real): one product and exp."""
        if not self.softmax:
            return self.keys_(self._logits(x, out), None, None, real)
        return self._shifted_exp_(x, offset, out)

    def queries_backward_(self, grad: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """d loss / d x (B, H, C, d) from grad = d loss / d phi and the query features phi in grad's dtype (a bf16
        grad, a bf16 product's result, is scaled in bf16: the next product would round it so anyway)."""
        if self.softmax:  # the subtracted row maximum cancels in D^-1: no gradient through it
            grad.mul_(phi)
        else:  # active where W x > 0, i.e. where phi is above eps (as grad's dtype rounds eps)
            grad = torch.ops.aten.threshold_backward(grad, phi, _relu_floor(grad.dtype))
        return grad if self.w is None else mm(grad, self.w, self.low)

    def keys_backward_(self, grad: torch.Tensor, phi: torch.Tensor, x: torch.Tensor, total=None) -> torch.Tensor:
        """As queries_backward_ for keys, whose exponent also holds -|x'|^2/2 (g is detached: it cancels). total:
        sum(grad * phi, -1) (B, H, C, 1) when the caller has it, else computed here."""
        if not self.softmax:
            return self.queries_backward_(grad, phi)  # padded keys: phi = 0, so no gradient
        grad.mul_(phi)
        total = grad.sum(-1, keepdim=True, dtype=acc_dtype(grad)) if total is None else total
        # float32 from bf16 operands in one operator, no slower than after converting both (measured)
        return torch.addcmul(mm(grad, self.w, self.low), total, x, value=-self.scale**2)


def _exp2_rows_(out: torch.Tensor, shift: torch.Tensor, find_max: bool) -> torch.Tensor:
    """out (B, H, C, F) <- exp2(out - shift) per row; with find_max, shift (B, H, C) <- the row maxima first (written
    in place). bf16 buffers (BlockFeatures.buffer_dtype): one pass of the fused CPU kernel; float32: torch's
    operators, its reference."""
    if out.dtype == torch.bfloat16:
        cpu_kernels.load().exp2_rows(out, shift.view(-1, shift.shape[-1]), find_max)
        return out
    if find_max:
        torch.amax(out, -1, out=shift)
    return out.sub_(shift[..., None]).exp2_()


def _row_maxima(out: torch.Tensor) -> torch.Tensor:
    """The row maxima (B, H, C) of out (B, H, C, F) in float32 (or float64): the fused CPU kernel for bf16 buffers
    (torch's maximum over bf16 runs 6x slower than over float32), else torch's."""
    if out.dtype == torch.bfloat16:
        top = out.new_empty(out.shape[:-1], dtype=torch.float32)
        cpu_kernels.load().max_rows(out, top.view(-1, top.shape[-1]))
        return top
    return out.amax(-1)


def _relu_features_(out: torch.Tensor) -> torch.Tensor:
    """out <- relu(out) + eps: the fused CPU kernel for bf16 buffers, else torch's operators."""
    if out.dtype == torch.bfloat16:
        cpu_kernels.load().relu_eps(out, RELU_EPS)
        return out
    return out.relu_().add_(RELU_EPS)


@functools.cache
def _relu_floor(dtype: torch.dtype) -> float:
    """phi = relu(x) + eps of an inactive x, as a tensor of `dtype` holds it."""
    return torch.tensor(RELU_EPS, dtype=dtype).item()


# ---- shared by the bidirectional and causal Functions ----------------------------------------------------------

def add_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, low: torch.dtype | None = None) -> torch.Tensor:
    """acc += a @ b for (..., ., .) operands with the same batch dimensions, in place (no temporary product in full
    precision)."""
    if low is not None:  # the bf16 product added into a float32 acc in place: as fast as converting it first
        return acc.add_(torch.matmul(a.to(low), b.to(low)))
    acc.view(-1, *acc.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return acc


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of sums, maxima and exponents for x: float32 for bf16 (and float32) x, float64 for float64 x."""
    return torch.promote_types(x.dtype, torch.float32)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[V, 1] (..., d_v + 1): the last column carries the denominator D through the numerator's products."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)


def new_output(q: torch.Tensor, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, H, L, d_v) output stored as (B, L, H, d_v), so that the caller's merge of heads
    out.transpose(1, 2).flatten(2) is a view, and the (B, H, L, 1) denominators, both in q's dtype."""
    b, h, length, _ = q.shape
    return q.new_empty(b, length, h, d_v).transpose(1, 2), q.new_empty(b, h, length, 1)


def empty_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like x whose dimensions lie in memory in x's order (torch.empty_like keeps that only
    for dense x). The model's q, k, v are views into the packed projection, (B, L, H, d) in memory: their gradients
    laid out so are stacked back into the projection's gradient by one contiguous copy instead of a transposing
    one (layers.SplitHeads), 4.8x faster for the `small` preset's shapes in bf16."""
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))  # outermost first
    return x.new_empty([x.shape[i] for i in order]).permute([order.index(i) for i in range(x.dim())])


def normalise_(y: torch.Tensor, out: torch.Tensor, den: torch.Tensor) -> None:
    """out <- numerator / D and den <- D for rows y = [numerator, D]; D is clamped to the smallest normal number,
    which only changes rows without any real key (0 instead of 0 / 0). The division runs in y's dtype (bf16
    products: D is a bf16 value, and a mixed-dtype op runs several times slower on the CPU)."""
    torch.clamp_min(y[..., -1:], torch.finfo(y.dtype).tiny, out=den)
    torch.div(y[..., :-1], den, out=out)


def grad_denominators(den: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The saved D (B, H, L, 1) as grad_y reads it, once per backward: in the gradient's dtype, and inf for rows
    without a real key (D clamped, out = 0), which then get no gradient (d_out / inf, not d_out / tiny)."""
    return den.masked_fill(den <= torch.finfo(den.dtype).tiny, torch.inf).to(dtype)


def grad_y(d_out: torch.Tensor, out: torch.Tensor, den: torch.Tensor, into: torch.Tensor | None = None):
    """d loss / d [numerator, D] (..., d_v + 1) from d loss / d out, for out = numerator / D and den from
    grad_denominators; written into `into` when given (a contiguous buffer: about 3x faster than building it from
    the strided d_out and out)."""
    dy = d_out.new_empty(*d_out.shape[:-1], d_out.shape[-1] + 1) if into is None else into
    d_num = torch.div(d_out, den, out=dy[..., :-1])
    torch.sum(d_num * out, -1, keepdim=True, out=dy[..., -1:]).neg_()
    return dy


def rows(buffer: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a (B, H, R, m) work buffer as a contiguous (B, H, n, m) tensor (matmul's out= needs
    one: it folds a contiguous input's batch dimensions into its rows)."""
    b, h, _, m = buffer.shape
    return buffer.view(-1)[: b * h * n * m].view(b, h, n, m)


def blocks(length: int, block: int):
    return ((s, min(s + block, length)) for s in range(0, length, block))


def no_autocast(device: torch.device):
    """Autocast off for this device (a no-op context on devices without autocast, e.g. "meta")."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def without_autocast(backward):
    """For the hand-written backward passes: the product dtype is the one the forward chose (ctx.low), also when
    loss.backward() runs inside an autocast region."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with no_autocast(next(g for g in grads if g is not None).device):
            return backward(ctx, *grads)

    return wrapped


def causal_mask(rows: int, cols: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(rows, cols) bool, True where a query may see a key: the `rows` queries are the last of `cols` positions, so
    query i sees keys j <= i + cols - rows (square: the lower triangle)."""
    cols = rows if cols is None else cols
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril(cols - rows)
