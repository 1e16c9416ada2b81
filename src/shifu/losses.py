"""Distillation losses as small functions over answer tokens, each tested against a dense reference.

    from shifu.losses import distill_loss
    kd = distill_loss(student_logits, ids, teacher_logprobs, variant="forward_kl", temperature=2.0)

The teacher's distribution per token is sparse: k candidate token ids (-1 pads) with log-probs,
as an API returns top-k logprobs. Both distributions are folded onto the same k + 1 buckets: the
k candidates and one tail bucket holding the mass of every other token (1 - sum of the k). With
k equal to the whole vocabulary the tail is empty and each divergence is the ordinary one.
Temperature: the student's logits are divided by T before the softmax; the teacher's bucket
log-probs are divided by T and renormalised (exact for the candidates, the tail treated as one
token). The result is multiplied by T^2 so that gradients keep their scale across temperatures.
All functions return one value per token; the caller averages over answer tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAIL_FLOOR = -30.0  # log-mass floor of a tail bucket: keeps log(0) out of the gradients


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail(logp_k: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """(N, k) candidate log-probs (-inf where padded) -> (N, k + 1) with the tail bucket last.

    A tail below `noise` (rounding in stored top-k sums) is set to the floor, not kept as mass."""
    tail = _log1mexp(torch.logsumexp(logp_k, dim=-1, keepdim=True))
    if noise:
        tail = torch.where(tail < torch.log(torch.tensor(noise)), torch.full_like(tail, TAIL_FLOOR), tail)
    return torch.cat([logp_k, tail.clamp(min=TAIL_FLOOR)], dim=-1)


def bucket_log_probs(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                     temperature: float = 1.0, student_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (teacher, student) log-probs over the k + 1 buckets, both (N, k + 1).

    `student_logp`, the log-softmax of the logits at this temperature when the caller has it already
    (training shares one with the cross-entropy), saves a second pass over the vocabulary."""
    valid = ids >= 0
    s_logp = student_logp if student_logp is not None else F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_k = s_logp.gather(-1, ids.clamp(min=0)).masked_fill(~valid, float("-inf"))
    t_k = teacher_logprobs.float().masked_fill(~valid, float("-inf"))
    t = _with_tail(t_k, noise=1e-5)
    if temperature != 1.0:
        t = F.log_softmax(t / temperature, dim=-1)
    return t, _with_tail(s_k)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row; buckets where p is zero contribute nothing."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q)."""
    return torch.logsumexp(torch.stack([logp + torch.log(torch.tensor(w)), logq + torch.log(torch.tensor(1 - w))]), 0)


def forward_kl(t: torch.Tensor, s: torch.Tensor, **_) -> torch.Tensor:
    return _kl(t, s)


def reverse_kl(t: torch.Tensor, s: torch.Tensor, **_) -> torch.Tensor:
    return _kl(s, t)


def jsd(t: torch.Tensor, s: torch.Tensor, beta: float = 0.5, **_) -> torch.Tensor:
    """Generalized JSD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q."""
    m = _mix(t, s, beta)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def skew_kl(t: torch.Tensor, s: torch.Tensor, skew_alpha: float = 0.1, **_) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || a * p + (1 - a) * q)."""
    return _kl(t, _mix(t, s, skew_alpha))


def skew_reverse_kl(t: torch.Tensor, s: torch.Tensor, skew_alpha: float = 0.1, **_) -> torch.Tensor:
    """KL(q || a * q + (1 - a) * p)."""
    return _kl(s, _mix(s, t, skew_alpha))


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd,
               "skew_kl": skew_kl, "skew_reverse_kl": skew_reverse_kl}


def distill_loss(student_logits: torch.Tensor | None, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 variant: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 skew_alpha: float = 0.1, student_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token distillation loss, (N,), scaled by T^2."""
    t, s = bucket_log_probs(student_logits, ids, teacher_logprobs, temperature, student_logp)
    return DIVERGENCES[variant](t, s, beta=beta, skew_alpha=skew_alpha) * temperature ** 2


def combine(ce: torch.Tensor, kd: torch.Tensor, has_teacher: torch.Tensor, kd_ratio: float) -> torch.Tensor:
    """Per-token loss: (1 - r) * CE + r * KD where the teacher's distribution is known, CE elsewhere."""
    return torch.where(has_teacher, (1 - kd_ratio) * ce + kd_ratio * kd, ce)


# ---- the training loss over the vocabulary head, whole or in chunks --------------------------------

LOGIT_CHUNK = 512  # answer positions whose full-vocabulary logits exist at once (152k x 512 fp32: 0.3 GB)


def loss_sums(logits: torch.Tensor, targets: torch.Tensor, kd_ids: torch.Tensor | None, kd_lps: torch.Tensor | None,
              d) -> torch.Tensor:
    """[sum of per-token losses, sum of CE, sum of KD where the teacher is known, tokens with a teacher].

    `d` carries kd_ratio, variant, temperature, beta and skew_alpha (a DistillConfig)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # one pass over the vocabulary for CE and KD alike
    ce = -logp.gather(1, targets[:, None]).squeeze(1)
    per_token, kd_sum, n_kd = ce, ce.new_zeros(()), ce.new_zeros(())
    if kd_ids is not None and d.kd_ratio > 0:
        has = (kd_ids >= 0).any(-1)
        if has.any():
            # rows without a teacher give finite values that combine() discards: no N x V copies
            s_logp = logp if d.temperature == 1.0 else F.log_softmax(logits.float() / d.temperature, dim=-1)
            kd = distill_loss(None, kd_ids, kd_lps, d.variant, d.temperature, d.beta, d.skew_alpha, student_logp=s_logp)
            per_token = combine(ce, kd, has, d.kd_ratio)
            kd_sum, n_kd = kd[has].sum(), has.sum().to(ce.dtype)
    return torch.stack([per_token.sum(), ce.sum(), kd_sum, n_kd])


class _KnownGradients(torch.autograd.Function):
    """Passes the loss sums through; in the backward pass hands the hidden states and the trainable
    head weights the gradients already computed for them, times the incoming one."""

    @staticmethod
    def forward(ctx, sums, hidden, grad_h, n_params, *params_then_grads):
        ctx.n_params = n_params
        ctx.save_for_backward(grad_h, *params_then_grads[n_params:])
        return sums.clone()

    @staticmethod
    def backward(ctx, grad_sums):
        grad_h, *grad_p = ctx.saved_tensors
        scale = grad_sums[0]  # only the total loss is differentiated; the other sums are for the logs
        return (None, grad_h * scale.to(grad_h.dtype), None, None,
                *[g * scale.to(g.dtype) for g in grad_p], *[None] * ctx.n_params)


def chunked_loss_sums(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                      kd_ids: torch.Tensor | None, kd_lps: torch.Tensor | None, d,
                      chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """`loss_sums(head(hidden), ...)` without ever holding the logits of more than `chunk` positions:
    memory is chunk x vocabulary, not answer tokens x vocabulary. While a chunk's logits exist, the
    gradients of the total for its hidden states (and any trainable head weights) are computed and
    kept, and the logits freed; the backward pass then only scales them, so the head's matmul is
    not run twice (Liger Kernel's fused linear cross-entropy does the same in Triton)."""
    params = [p for p in head.parameters() if p.requires_grad]
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(params))
    grad_h = torch.zeros_like(hidden) if need_grad else None
    grad_p = [torch.zeros_like(p) for p in params]
    dtype = head.weight.dtype  # under the Trainer's autocast only the model's forward is cast
    sums = []
    for s in range(0, hidden.shape[0], chunk):
        sl = slice(s, s + chunk)
        h = hidden[sl].detach().requires_grad_(need_grad)
        ids, lps = (kd_ids[sl], kd_lps[sl]) if kd_ids is not None else (None, None)
        part = loss_sums(head(h.to(dtype)), targets[sl], ids, lps, d)
        if need_grad:
            grads = torch.autograd.grad(part[0], [h, *params], allow_unused=True)
            grad_h[sl] = grads[0]
            for acc, g in zip(grad_p, grads[1:]):
                if g is not None:
                    acc += g
        sums.append(part.detach())
    total = torch.stack(sums).sum(0) if sums else hidden.new_zeros(4, dtype=torch.float32)
    if not need_grad:
        return total
    return _KnownGradients.apply(total, hidden, grad_h, len(params), *params, *grad_p)
