"""Each divergence against a dense reference built from full distributions."""

import pytest
import torch
import torch.nn.functional as F

from shifu.losses import bucket_log_probs, combine, distill_loss

V, N = 11, 5


def dense_teacher(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(N, V, generator=g) * 2, -1)


def student(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * 2


def all_ids():
    return torch.arange(V).expand(N, V).clone()


def ref_kl(logp, logq):
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # KL(p || q)


def mix(logp, logq, w):
    return torch.log(w * logp.exp() + (1 - w) * logq.exp())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_match_dense_reference(temperature):
    t, s = dense_teacher(), student()
    logq = F.log_softmax(s / temperature, -1)
    logp = F.log_softmax(t / temperature, -1)
    got = distill_loss(s, all_ids(), t, "forward_kl", temperature)
    assert torch.allclose(got, ref_kl(logp, logq) * temperature ** 2, atol=1e-5)
    got = distill_loss(s, all_ids(), t, "reverse_kl", temperature)
    assert torch.allclose(got, ref_kl(logq, logp) * temperature ** 2, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_dense_reference(beta):
    t, s = dense_teacher(), student()
    logq = F.log_softmax(s, -1)
    m = mix(t, logq, beta)
    want = beta * ref_kl(t, m) + (1 - beta) * ref_kl(logq, m)
    assert torch.allclose(distill_loss(s, all_ids(), t, "jsd", beta=beta), want, atol=1e-5)


def test_skew_kls_match_dense_reference():
    t, s, a = dense_teacher(), student(), 0.1
    logq = F.log_softmax(s, -1)
    assert torch.allclose(distill_loss(s, all_ids(), t, "skew_kl", skew_alpha=a), ref_kl(t, mix(t, logq, a)), atol=1e-5)
    assert torch.allclose(distill_loss(s, all_ids(), t, "skew_reverse_kl", skew_alpha=a),
                          ref_kl(logq, mix(logq, t, a)), atol=1e-5)


def test_sparse_top_k_equals_dense_kl_over_buckets():
    """Top-k + tail: the KL between the bucketed distributions, computed densely by hand."""
    t, s, k = dense_teacher(), student(), 3
    top = t.topk(k, -1)
    got = distill_loss(s, top.indices, top.values, "forward_kl")
    p = top.values.exp()
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    q_full = F.softmax(s, -1)
    q = q_full.gather(-1, top.indices)
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    want = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(got, want, atol=1e-5)


def test_padded_candidates_are_ignored():
    t, s = dense_teacher(), student()
    top = t.topk(3, -1)
    ids = torch.cat([top.indices, torch.full((N, 2), -1)], -1)
    lps = torch.cat([top.values, torch.full((N, 2), float("-inf"))], -1)
    assert torch.allclose(distill_loss(s, ids, lps), distill_loss(s, top.indices, top.values), atol=1e-6)


def test_zero_when_student_equals_teacher_and_gradient_flows():
    t = dense_teacher()
    s = t.clone().requires_grad_(True)
    for variant in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"):
        assert distill_loss(s, all_ids(), t, variant).abs().max() < 1e-5
    s2 = student().requires_grad_(True)
    distill_loss(s2, all_ids(), t).sum().backward()
    assert s2.grad is not None and s2.grad.abs().sum() > 0


def test_buckets_are_distributions():
    t, s = dense_teacher(), student()
    top = t.topk(4, -1)
    tb, sb = bucket_log_probs(s, top.indices, top.values, temperature=1.5)
    assert torch.allclose(tb.exp().sum(-1), torch.ones(N), atol=1e-5)
    assert torch.allclose(sb.exp().sum(-1), torch.ones(N), atol=1e-5)


def test_combine_mixes_only_where_the_teacher_is_known():
    ce, kd = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    has = torch.tensor([True, False, True])
    assert torch.allclose(combine(ce, kd, has, 0.25), torch.tensor([0.75 + 2.5, 2.0, 2.25 + 7.5]))


@pytest.mark.parametrize("variant", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_padded_rows_and_rows_without_teacher_stay_finite(variant, temperature):
    """Training computes KD on every answer row and masks afterwards: no NaN may leak into gradients."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    inf = float("-inf")
    ids = torch.tensor([[1, 2, -1], [3, -1, -1], [-1, -1, -1], [4, 5, 6]])
    lps = torch.tensor([[-0.1, -2.5, inf], [-0.2, inf, inf], [inf, inf, inf], [-1.0, -1.5, -2.0]])
    loss = distill_loss(logits, ids, lps, variant, temperature)
    combine(torch.ones(4), loss, ids[:, 0] >= 0, 0.5).sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert logits.grad[2].abs().sum() == 0  # the row without a teacher gets no distillation gradient


@pytest.mark.parametrize("variant,temperature", [("forward_kl", 1.0), ("jsd", 2.0), ("reverse_kl", 1.0)])
def test_chunked_head_loss_and_gradients_equal_the_whole_one(variant, temperature):
    """The head run in chunks of 7 positions gives the loss and gradients of full logits (shifu.losses)."""
    from types import SimpleNamespace

    from shifu.losses import chunked_loss_sums, loss_sums

    g = torch.Generator().manual_seed(0)
    n, hid, vocab, k = 23, 16, 50, 4
    d = SimpleNamespace(kd_ratio=0.5, variant=variant, temperature=temperature, beta=0.5, skew_alpha=0.1)
    targets = torch.randint(0, vocab, (n,), generator=g)
    ids = torch.randint(0, vocab, (n, k), generator=g)
    ids[::3] = -1  # tokens without a teacher distribution
    lps = F.log_softmax(torch.randn(n, k, generator=g), -1) - 0.3
    results = []
    for chunked in (False, True):
        torch.manual_seed(1)
        head = torch.nn.Linear(hid, vocab, bias=False)  # trainable here, so its gradient is checked too
        hidden = torch.randn(n, hid, generator=torch.Generator().manual_seed(2), requires_grad=True)
        sums = (chunked_loss_sums(hidden, head, targets, ids, lps, d, chunk=7) if chunked
                else loss_sums(head(hidden), targets, ids, lps, d))
        sums[0].backward()
        results.append((sums.detach(), hidden.grad, head.weight.grad))
    (s0, h0, w0), (s1, h1, w1) = results
    assert s0[3] == n - len(range(0, n, 3))  # the tokens with a teacher are counted
    assert torch.allclose(s0, s1, atol=1e-5) and torch.allclose(h0, h1, atol=1e-6) and torch.allclose(w0, w1, atol=1e-6)
    assert h0.abs().sum() > 0


def test_chunked_head_never_holds_more_than_a_chunk_of_logits():
    """Saved for backward: the chunks' inputs, never a tokens x vocabulary tensor."""
    from types import SimpleNamespace

    from shifu.losses import chunked_loss_sums

    n, hid, vocab = 64, 8, 1000
    d = SimpleNamespace(kd_ratio=0.0, variant="forward_kl", temperature=1.0, beta=0.5, skew_alpha=0.1)
    head = torch.nn.Linear(hid, vocab, bias=False)
    hidden = torch.randn(n, hid, requires_grad=True)
    biggest = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: biggest.append(t.numel()) or t, lambda t: t):
        chunked_loss_sums(hidden, head, torch.zeros(n, dtype=torch.long), None, None, d, chunk=16)[0].backward()
    assert max(biggest) < 16 * vocab + 1 and hidden.grad is not None
