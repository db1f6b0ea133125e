"""Token log-probs, entropy and exact KL from logits, computed chunk by chunk.

With z = logits / temperature and log p = z - logsumexp(z):

    token_logprobs       log p[token]
    entropy_from_logits  H = -sum_j p_j log p_j
    full_kl_from_logits  KL(p || q) = sum_j p_j (log p_j - log q_j)     (q from the reference logits)

Why the chunking: a float32 log-softmax over [B, T, V] is B*T*V*4 bytes (8 x 1024 x 32000 -> 1 GiB), several
times that with autograd's saved intermediates. Here rows (B*T flattened, or only the rows where `mask_BT`
is nonzero) are processed `chunk_size` at a time, so at most two float32 [chunk_size, V] buffers exist at
once (three for the KL). By default a chunk is as many rows as fit a 16 MiB float32 buffer (85 rows at
V = 49152, 1024 at most): allocations under glibc's mmap threshold (at most 32 MiB) are reused from the heap
chunk after chunk, where larger ones are mapped afresh and page-faulted in every time. At V = 49152 that
made a [1024, V] buffer cost 48 ms to fill against 7 ms for an in-place pass over it, and 32 x 128 rows'
log-probs, entropy and gradient 2.1 s with 1024-row chunks against 1.0 s with 85-row ones.
Backward additionally allocates the [B, T, V] gradient itself, in the logits' dtype, as any backward must.
Each function is a `torch.autograd.Function` that saves only its inputs (original dtype, no copy) plus
per-row [M] tensors, and recomputes the softmax chunk by chunk in backward from

    d log p[tok] / dz_j = onehot_j - p_j
    d H / dz_j          = -p_j (log p_j + H)
    d KL / dz_j         = p_j ((log p_j - log q_j) - KL)
    d z / d logits      = 1 / temperature

Truncated sampling (top_k > 0 or top_p < 1): a sampler that keeps the set K(z) of the most probable tokens
draws from p restricted to K and renormalised, p_K = softmax(z masked to K). Its log-probs differ from the
full softmax's by log S, S = sum_{j in K} p_j the kept mass, and so would every ratio and KL estimate that
mixes the two. Given top_k / top_p, these functions evaluate p_K itself: K is recomputed from z exactly as
transformers' TopKLogitsWarper and TopPLogitsWarper choose it (so at theta_old it is the sampler's set and the
first ratio is exactly 1), logits outside K are -inf, and the gradient flows through the kept logits only
(K is piecewise constant in z). The sampled token is always kept: after an update it may have left K, where
p_K would give log 0; keeping it gives the finite log-prob of K plus that token instead.

The math is float32 even for bf16/fp16 logits (float64 stays float64, which is what gradcheck uses).
Positions where `mask_BT` is 0 are never computed: their outputs are 0 and their logit gradients are 0.
(Finding the valid rows is a nonzero(), i.e. one host sync per call; without a mask there is none.)
Gradients flow to `logits_BTV` only (never to `tokens_BT`, `mask_BT` or the reference logits).
Double backward is not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["token_logprobs", "entropy_from_logits", "logprobs_and_entropy", "full_kl_from_logits", "truncation_keep"]


# ---------------------------------------------------------------------------------------------------------
# helpers


CHUNK_BYTES = 16 << 20  # a float32 [chunk, V] buffer's size by default: under glibc's mmap threshold


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: as many as fit a CHUNK_BYTES float32 buffer, at least 1 and at most 1024."""
    return max(1, min(1024, CHUNK_BYTES // (4 * vocab_size)))


def _check(logits_BTV: Tensor, like_BT: Tensor | None, mask_BT: Tensor | None, temperature: float,
           chunk_size: int | None) -> int:
    """Validates the arguments; returns the chunk size (the default for the vocabulary when None)."""
    if logits_BTV.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits_BTV.shape)}")
    BT = tuple(logits_BTV.shape[:2])
    for name, t in (("tokens/ref", like_BT), ("mask_BT", mask_BT)):
        if t is not None and tuple(t.shape[:2]) != BT:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match logits [B, T] = {BT}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        return default_chunk_size(logits_BTV.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half types, float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rows(B: int, T: int, mask_BT: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(b, t) indices of the rows to compute: all of them, or those where mask_BT != 0."""
    if mask_BT is None:
        flat = torch.arange(B * T, device=device)
    else:
        # The one host sync in this module, by design: the number of valid rows sets how much we compute.
        flat = mask_BT.reshape(-1).nonzero().squeeze(1).to(device)
    return flat // T, flat % T


def _load(logits_BTV: Tensor, b: Tensor, t: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """Fresh [C, V] tensor of logits / temperature in the compute dtype (safe to overwrite in place).

    Advanced indexing always copies, which also makes non-contiguous inputs (e.g. logits[:, :-1]) free.
    """
    z = logits_BTV[b, t].to(dtype)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def truncation_keep(z: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor | None:
    """The tokens a top-k then top-p sampler may draw from z = logits / T [..., V] (bool, same shape), or
    None when neither truncates. As transformers' warpers: top-k keeps every token tied with the k-th value;
    top-p, on what top-k left, drops the least probable tokens whose cumulative probability is <= 1 - top_p
    and always keeps the most probable one."""
    keep = None
    if 0 < top_k < z.shape[-1]:
        keep = z >= torch.topk(z, top_k, dim=-1).values[..., -1:]
    if top_p < 1.0:
        s = z if keep is None else z.masked_fill(~keep, float("-inf"))
        sorted_z, order = torch.sort(s, descending=False)
        drop_sorted = sorted_z.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        keep = ~drop if keep is None else keep & ~drop
    return keep


def _truncate_(z: Tensor, tok: Tensor | None, top_k: int, top_p: float) -> Tensor | None:
    """Mask z [C, V] in place to the sampler's kept set plus the sampled tokens; returns that set (None: no
    truncation)."""
    keep = truncation_keep(z, top_k=top_k, top_p=top_p)
    if keep is not None:
        if tok is not None:
            keep.scatter_(1, tok[:, None], True)
        z.masked_fill_(~keep, float("-inf"))
    return keep


def _log_softmax_(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In-place log-softmax of a fresh [C, V] tensor. Returns (log p in z's storage, p, logsumexp [C]).

    Written out (rather than torch.logsumexp + subtraction) so that peak memory is z plus one buffer for p.
    """
    m = z.amax(dim=-1, keepdim=True)
    p = z.sub_(m).exp()  # unnormalised
    s = p.sum(dim=-1, keepdim=True)
    log_s = s.log()
    logp = z.sub_(log_s)
    p.div_(s)
    return logp, p, (m + log_s).squeeze(-1)


def _finite_(logp: Tensor) -> Tensor:
    # -inf logits (masked vocab entries) have p = 0; clamping log p keeps 0 * log 0 = 0 instead of nan.
    return logp.clamp_(min=torch.finfo(logp.dtype).min)


def _scatter_rows(values_M: Tensor, b: Tensor, t: Tensor, B: int, T: int) -> Tensor:
    out = values_M.new_zeros(B, T)
    out[b, t] = values_M
    return out


def _chunks(M: int, chunk_size: int):
    for start in range(0, M, chunk_size):
        yield slice(start, min(start + chunk_size, M))


# ---------------------------------------------------------------------------------------------------------
# log p[token] and entropy


def _logp_entropy_chunk(
    z: Tensor, tok: Tensor | None, with_entropy: bool, truncated: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """For one chunk z = logits/T [C, V] (overwritten): (logsumexp [C], log p[tok] [C], H [C]).

    With m = max_j z_j, e_j = exp(z_j - m) and s = sum_j e_j:

        logsumexp = m + log s,   log p[tok] = (z_tok - m) - log s,   H = log s - sum_j e_j (z_j - m) / s

    (H = -sum_j p_j log p_j with log p_j = (z_j - m) - log s), so no normalised [C, V] p or log p is written:
    about six passes over the chunk (max, subtract, exp, sum, then e * (z - m) in place and its sum) where a log-softmax
    followed by -sum p log p takes eleven. With a large vocabulary these passes are what the pass costs.
    A function rather than the loop body so that its [C, V] temporaries are freed on return.
    """
    m = z.amax(dim=-1, keepdim=True)
    zc = z.sub_(m)
    if truncated:  # -inf outside the kept set: e_j = 0 there, and 0 * (finite) keeps the dot product finite
        _finite_(zc)
    e = zc.exp()
    sum_e = e.sum(dim=-1)
    log_s = sum_e.log()
    logp_tok = None if tok is None else zc.gather(1, tok[:, None]).squeeze(1) - log_s
    entropy = None
    if with_entropy:
        ez = e.mul_(zc).sum(dim=-1)  # sum_j e_j (z_j - m), in e's storage
        if not torch.isfinite(ez).all():  # a -inf logit from the caller: e_j = 0 there, and 0 * -inf = nan
            ez = _finite_(zc).exp().mul_(zc).sum(dim=-1)
        entropy = log_s - ez / sum_e
    return m.squeeze(-1) + log_s, logp_tok, entropy


def _logp_entropy_grad_chunk(
    z: Tensor, tok: Tensor | None, lse: Tensor, entropy: Tensor | None, g_lp: Tensor | None, g_H: Tensor | None
) -> Tensor:
    """d(g_lp . log p[tok] + g_H . H) / dz for one chunk [C, V] (the 1/T factor is applied by the caller).

        grad_j = g_lp (onehot_j - p_j) - g_H p_j (log p_j + H)
               = p_j (a log p_j + c) + g_lp onehot_j,   a = -g_H,  c = -(g_H H + g_lp)
    """
    logp = _finite_(z.sub_(lse[:, None]))
    if g_H is None:
        grad = logp.exp_().mul_(-g_lp[:, None])  # -g_lp p_j
    else:
        c = -g_H * entropy if g_lp is None else -(g_H * entropy + g_lp)
        p = logp.exp()
        grad = p.mul_(logp.mul_(-g_H[:, None]).add_(c[:, None]))  # p_j (a log p_j + c)
    if g_lp is not None:
        grad.scatter_add_(1, tok[:, None], g_lp[:, None])  # + g_lp onehot_j
    return grad


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_BTV, tokens_BT, mask_BT, temperature, chunk_size, with_entropy, top_k, top_p):
        B, T, _ = logits_BTV.shape
        dtype = _compute_dtype(logits_BTV)
        b_M, t_M = _rows(B, T, mask_BT, logits_BTV.device)
        tok_M = None if tokens_BT is None else tokens_BT.to(logits_BTV.device)[b_M, t_M].long()
        M = b_M.numel()
        lse_M = logits_BTV.new_empty(M, dtype=dtype)
        logp_M = logits_BTV.new_zeros(M, dtype=dtype)
        ent_M = logits_BTV.new_zeros(M, dtype=dtype)
        for sl in _chunks(M, chunk_size):
            z = _load(logits_BTV, b_M[sl], t_M[sl], temperature, dtype)
            tok = None if tok_M is None else tok_M[sl]
            keep = _truncate_(z, tok, top_k, top_p)
            lse_M[sl], logp_tok, entropy = _logp_entropy_chunk(z, tok, with_entropy, truncated=keep is not None)
            del z  # its storage now holds log p; drop it before the next chunk is loaded
            if logp_tok is not None:
                logp_M[sl] = logp_tok
            if entropy is not None:
                ent_M[sl] = entropy
        ctx.save_for_backward(logits_BTV, tok_M, b_M, t_M, lse_M, ent_M if with_entropy else None)
        ctx.temperature, ctx.chunk_size, ctx.top_k, ctx.top_p = temperature, chunk_size, top_k, top_p
        ctx.set_materialize_grads(False)
        return _scatter_rows(logp_M, b_M, t_M, B, T), _scatter_rows(ent_M, b_M, t_M, B, T)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp_BT, g_ent_BT):
        logits_BTV, tok_M, b_M, t_M, lse_M, ent_M = ctx.saved_tensors
        # Fold the 1/T of z = logits / T into the upstream gradients (cheap: [M], not [M, V]).
        def rows(g_BT):
            return g_BT[b_M, t_M].to(lse_M.dtype) / ctx.temperature

        g_lp_M = None if g_logp_BT is None or tok_M is None else rows(g_logp_BT)
        g_H_M = None if g_ent_BT is None or ent_M is None else rows(g_ent_BT)
        if g_lp_M is None and g_H_M is None:
            return (None,) * 8
        grad_BTV = torch.zeros_like(logits_BTV)  # masked rows keep exactly zero gradient
        for sl in _chunks(b_M.numel(), ctx.chunk_size):
            z = _load(logits_BTV, b_M[sl], t_M[sl], ctx.temperature, lse_M.dtype)
            tok = None if tok_M is None else tok_M[sl]
            keep = _truncate_(z, tok, ctx.top_k, ctx.top_p)
            grad = _logp_entropy_grad_chunk(
                z,
                tok,
                lse_M[sl],
                None if ent_M is None else ent_M[sl],
                None if g_lp_M is None else g_lp_M[sl],
                None if g_H_M is None else g_H_M[sl],
            )
            if keep is not None:  # p_j = 0 outside the kept set (where 0 * inf may have left nan)
                grad = torch.where(keep, grad, 0.0)
            grad_BTV[b_M[sl], t_M[sl]] = grad.to(grad_BTV.dtype)
            del z
        return grad_BTV, None, None, None, None, None, None, None


def logprobs_and_entropy(
    logits_BTV: Tensor,
    tokens_BT: Tensor,
    *,
    temperature: float = 1.0,
    mask_BT: Tensor | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """(log softmax(logits/T)[tokens], entropy of softmax(logits/T)) per position, in one pass.

    logits_BTV[b, t] must be the logits that predict tokens_BT[b, t] (shift before calling).
    Returns float32 [B, T] tensors (float64 for float64 logits), 0 where mask_BT is 0; entropy is None
    when with_entropy=False. With top_k > 0 or top_p < 1, both are of the truncated distribution the
    sampler drew from (see the module docstring).
    """
    chunk_size = _check(logits_BTV, tokens_BT, mask_BT, temperature, chunk_size)
    logp_BT, ent_BT = _LogprobsEntropy.apply(logits_BTV, tokens_BT, mask_BT, temperature, chunk_size, with_entropy,
                                             top_k, top_p)
    return logp_BT, (ent_BT if with_entropy else None)


def token_logprobs(
    logits_BTV: Tensor,
    tokens_BT: Tensor,
    *,
    temperature: float = 1.0,
    mask_BT: Tensor | None = None,
    chunk_size: int | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """log softmax(logits_BTV / temperature)[tokens_BT] -> [B, T] float32, 0 where mask_BT is 0 (of the
    truncated distribution with top_k / top_p, as `logprobs_and_entropy`)."""
    return logprobs_and_entropy(
        logits_BTV, tokens_BT, temperature=temperature, mask_BT=mask_BT, chunk_size=chunk_size, with_entropy=False,
        top_k=top_k, top_p=top_p,
    )[0]


def entropy_from_logits(
    logits_BTV: Tensor,
    *,
    temperature: float = 1.0,
    mask_BT: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """H = -sum_j p_j log p_j of the full next-token distribution p = softmax(logits/T) -> [B, T]."""
    chunk_size = _check(logits_BTV, None, mask_BT, temperature, chunk_size)
    return _LogprobsEntropy.apply(logits_BTV, None, mask_BT, temperature, chunk_size, True, 0, 1.0)[1]


# ---------------------------------------------------------------------------------------------------------
# exact KL over the vocabulary


def _kl_chunk(z: Tensor, z_ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For one chunk: (logsumexp [C], ref logsumexp [C], KL [C]) with KL = sum_j p_j (log p_j - log q_j)."""
    logp, p, lse = _log_softmax_(z)
    logq, _, ref_lse = _log_softmax_(z_ref)
    diff = _finite_(logq).neg_().add_(_finite_(logp))  # log p - log q, in logq's storage
    return lse, ref_lse, diff.mul_(p).sum(dim=-1)


def _kl_grad_chunk(z: Tensor, z_ref: Tensor, lse: Tensor, ref_lse: Tensor, kl: Tensor, g: Tensor) -> Tensor:
    """g * dKL/dz_j = g p_j ((log p_j - log q_j) - KL) for one chunk [C, V]."""
    logp = _finite_(z.sub_(lse[:, None]))
    diff = _finite_(z_ref.sub_(ref_lse[:, None])).neg_().add_(logp)
    return diff.sub_(kl[:, None]).mul_(logp.exp_()).mul_(g[:, None])


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_BTV, ref_logits_BTV, mask_BT, temperature, chunk_size):
        B, T, _ = logits_BTV.shape
        dtype = _compute_dtype(logits_BTV, ref_logits_BTV)
        b_M, t_M = _rows(B, T, mask_BT, logits_BTV.device)
        M = b_M.numel()
        lse_M = logits_BTV.new_empty(M, dtype=dtype)
        ref_lse_M = logits_BTV.new_empty(M, dtype=dtype)
        kl_M = logits_BTV.new_zeros(M, dtype=dtype)
        for sl in _chunks(M, chunk_size):
            lse_M[sl], ref_lse_M[sl], kl_M[sl] = _kl_chunk(
                _load(logits_BTV, b_M[sl], t_M[sl], temperature, dtype),
                _load(ref_logits_BTV, b_M[sl], t_M[sl], temperature, dtype),
            )
        ctx.save_for_backward(logits_BTV, ref_logits_BTV, b_M, t_M, lse_M, ref_lse_M, kl_M)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return _scatter_rows(kl_M, b_M, t_M, B, T)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_BT):
        logits_BTV, ref_logits_BTV, b_M, t_M, lse_M, ref_lse_M, kl_M = ctx.saved_tensors
        g_M = g_BT[b_M, t_M].to(lse_M.dtype) / ctx.temperature  # z = logits / T
        grad_BTV = torch.zeros_like(logits_BTV)
        for sl in _chunks(b_M.numel(), ctx.chunk_size):
            b, t = b_M[sl], t_M[sl]
            grad_BTV[b, t] = _kl_grad_chunk(
                _load(logits_BTV, b, t, ctx.temperature, lse_M.dtype),
                _load(ref_logits_BTV, b, t, ctx.temperature, lse_M.dtype),
                lse_M[sl],
                ref_lse_M[sl],
                kl_M[sl],
                g_M[sl],
            ).to(grad_BTV.dtype)
        return grad_BTV, None, None, None, None


def full_kl_from_logits(
    logits_BTV: Tensor,
    ref_logits_BTV: Tensor,
    *,
    temperature: float = 1.0,
    mask_BT: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact KL(pi || pi_ref) = sum_j p_j (log p_j - log q_j) per position, both at the same temperature.

    Differentiable w.r.t. logits_BTV only; the reference gets no gradient. 0 where mask_BT is 0.
    """
    chunk_size = _check(logits_BTV, ref_logits_BTV, mask_BT, temperature, chunk_size)
    if ref_logits_BTV.shape != logits_BTV.shape:
        raise ValueError(f"ref logits {tuple(ref_logits_BTV.shape)} != logits {tuple(logits_BTV.shape)}")
    return _FullKL.apply(logits_BTV, ref_logits_BTV, mask_BT, temperature, chunk_size)
