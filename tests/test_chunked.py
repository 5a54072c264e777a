"""Tests for trl_opsd.chunked: the chunked path equals the dense path in values and gradients, for every form, and
never materialises full-sequence logits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trl_opsd.chunked import (
    chunked_per_token_divergence,
    chunked_sparse_topk_divergence,
    chunked_token_log_probs,
    default_chunk_size,
)
from trl_opsd.losses import (
    clip_per_token,
    masked_token_mean,
    per_token_divergence,
    per_token_entropy,
    pointwise_clipped_divergence,
    sparse_topk_divergence,
    token_log_probs,
)

# Shapes chosen so nothing divides evenly: 2 x 7 = 14 positions in chunks of 4, a prime vocabulary of 37, and a
# teacher narrower than the student.
BATCH, LENGTH, STUDENT_WIDTH, TEACHER_WIDTH, VOCAB, CHUNK = 2, 7, 8, 6, 37, 4
TEMPERATURE = 1.3


def make_heads(seed=0, with_bias=True):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    return {
        "student_hidden": randn(BATCH, LENGTH, STUDENT_WIDTH).requires_grad_(),
        "student_weight": randn(VOCAB, STUDENT_WIDTH, scale=0.7).requires_grad_(),
        "student_bias": randn(VOCAB, scale=0.3).requires_grad_() if with_bias else None,
        "teacher_hidden": randn(BATCH, LENGTH, TEACHER_WIDTH),
        "teacher_weight": randn(VOCAB, TEACHER_WIDTH, scale=0.7),
        "teacher_bias": randn(VOCAB, scale=0.3) if with_bias else None,
        "mask": torch.rand(BATCH, LENGTH, generator=generator) > 0.25,
    }


def student_logits(heads):
    logits = heads["student_hidden"] @ heads["student_weight"].T
    return logits + heads["student_bias"] if heads["student_bias"] is not None else logits


def teacher_logits(heads):
    logits = heads["teacher_hidden"] @ heads["teacher_weight"].T
    return logits + heads["teacher_bias"] if heads["teacher_bias"] is not None else logits


def student_parameters(heads):
    return [heads[name] for name in ("student_hidden", "student_weight", "student_bias") if heads[name] is not None]


def assert_same_loss_and_gradients(heads, chunked_loss, dense_loss):
    torch.testing.assert_close(chunked_loss, dense_loss, rtol=1e-5, atol=1e-5)
    chunked_grads = torch.autograd.grad(chunked_loss, student_parameters(heads))
    dense_grads = torch.autograd.grad(dense_loss, student_parameters(heads))
    for chunked_grad, dense_grad in zip(chunked_grads, dense_grads):
        assert dense_grad.abs().max() > 0
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip_mode", [None, "clamp", "scale"])
def test_chunked_divergence_equals_dense(beta, clip_mode):
    heads = make_heads()
    chunked = chunked_per_token_divergence(
        heads["student_hidden"],
        heads["student_weight"],
        heads["teacher_hidden"],
        heads["teacher_weight"],
        beta,
        TEMPERATURE,
        chunk_size=CHUNK,
        student_bias=heads["student_bias"],
        teacher_bias=heads["teacher_bias"],
    )
    dense = per_token_divergence(student_logits(heads), teacher_logits(heads), beta, TEMPERATURE)
    torch.testing.assert_close(chunked.values, dense, rtol=1e-5, atol=1e-5)

    cap = dense.detach().median().item() if clip_mode else None
    if clip_mode:
        above = dense.detach() > cap
        assert above.any() and (~above).any()  # the clip is active on some positions and not on others
    mask = heads["mask"]
    assert_same_loss_and_gradients(
        heads,
        masked_token_mean(clip_per_token(chunked.values, cap, clip_mode or "clamp"), mask),
        masked_token_mean(clip_per_token(dense, cap, clip_mode or "clamp"), mask),
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("cap", [0.02, 0.1])
@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_pointwise_clip_equals_dense(beta, cap, with_mask):
    """The written-out pointwise-clip gradient equals autograd of the dense clamp, for all three student tensors."""
    heads = make_heads(seed=6)
    mask = heads["mask"] if with_mask else None
    chunked = chunked_per_token_divergence(
        heads["student_hidden"], heads["student_weight"], heads["teacher_hidden"], heads["teacher_weight"], beta,
        TEMPERATURE, mask=mask, chunk_size=CHUNK, student_bias=heads["student_bias"],
        teacher_bias=heads["teacher_bias"], pointwise_cap=cap,
    )
    dense = pointwise_clipped_divergence(student_logits(heads), teacher_logits(heads), beta, cap, TEMPERATURE)
    keep = heads["mask"] if with_mask else torch.ones_like(heads["mask"])
    assert 0 < dense.clipped_entries[keep].sum() < keep.sum() * VOCAB  # the cap is active on some entries only
    torch.testing.assert_close(chunked.clip.unclipped[keep], dense.unclipped[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.clip.clipped_entries[keep], dense.clipped_entries[keep])
    # A second, per-position clip on top (clamp at the median) checks the upstream gradient reaches the recompute.
    per_position_cap = dense.values.detach()[keep].median().item()
    assert_same_loss_and_gradients(
        heads,
        masked_token_mean(clip_per_token(chunked.values, per_position_cap, "scale"), heads["mask"]),
        masked_token_mean(clip_per_token(dense.values, per_position_cap, "scale"), heads["mask"]),
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_with_mask_skips_padding(beta):
    heads = make_heads(seed=1, with_bias=False)
    mask = heads["mask"]
    chunked = chunked_per_token_divergence(
        heads["student_hidden"],
        heads["student_weight"],
        heads["teacher_hidden"],
        heads["teacher_weight"],
        beta,
        TEMPERATURE,
        mask=mask,
        chunk_size=CHUNK,
    )
    dense = per_token_divergence(student_logits(heads), teacher_logits(heads), beta, TEMPERATURE)
    assert torch.all(chunked.values[~mask] == 0)
    torch.testing.assert_close(chunked.values[mask], dense[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        chunked.student_entropy[mask], per_token_entropy(student_logits(heads), TEMPERATURE)[mask]
    )
    torch.testing.assert_close(
        chunked.teacher_entropy[mask], per_token_entropy(teacher_logits(heads), TEMPERATURE)[mask]
    )
    (hidden_grad,) = torch.autograd.grad(chunked.values.sum(), heads["student_hidden"], retain_graph=True)
    assert torch.all(hidden_grad[~mask] == 0) and torch.all(hidden_grad[mask].abs().sum(-1) > 0)
    assert_same_loss_and_gradients(
        heads, masked_token_mean(chunked.values, mask, 20), masked_token_mean(dense, mask, 20)
    )


def test_chunked_divergence_teacher_gets_no_gradient_even_with_a_shared_head():
    heads = make_heads(seed=2, with_bias=False)
    shared_weight = heads["student_weight"]
    teacher_hidden = torch.randn(BATCH, LENGTH, STUDENT_WIDTH, requires_grad=True)
    chunked = chunked_per_token_divergence(
        heads["student_hidden"], shared_weight, teacher_hidden, shared_weight, 0.5, chunk_size=CHUNK
    )
    dense = per_token_divergence(
        heads["student_hidden"] @ shared_weight.T, (teacher_hidden @ shared_weight.T).detach(), 0.5
    )
    chunked_grads = torch.autograd.grad(chunked.values.sum(), [heads["student_hidden"], shared_weight])
    dense_grads = torch.autograd.grad(dense.sum(), [heads["student_hidden"], shared_weight])
    for chunked_grad, dense_grad in zip(chunked_grads, dense_grads):
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):  # no graph reaches the teacher's hidden states
        torch.autograd.grad(chunked.values.sum(), teacher_hidden)


@pytest.mark.parametrize("chunk_size", [1, 3, 14, 100])
def test_chunked_divergence_independent_of_chunk_size(chunk_size):
    heads = make_heads(seed=3)
    args = (heads["student_hidden"], heads["student_weight"], heads["teacher_hidden"], heads["teacher_weight"], 0.5)
    reference = chunked_per_token_divergence(*args, chunk_size=CHUNK).values
    torch.testing.assert_close(chunked_per_token_divergence(*args, chunk_size=chunk_size).values, reference)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_sparse_topk_equals_dense_sparse(beta):
    heads = make_heads(seed=4)
    teacher_log_probs = torch.log_softmax(teacher_logits(heads) / TEMPERATURE, -1)
    ids = teacher_log_probs.topk(5, dim=-1).indices
    ids[0, 0, 3:] = -1  # a position with fewer than K entries
    log_probs = teacher_log_probs.gather(-1, ids.clamp(min=0))
    chunked = chunked_sparse_topk_divergence(
        heads["student_hidden"],
        heads["student_weight"],
        ids,
        log_probs,
        beta,
        TEMPERATURE,
        chunk_size=CHUNK,
        student_bias=heads["student_bias"],
    )
    dense = sparse_topk_divergence(student_logits(heads), ids, log_probs, beta, TEMPERATURE)
    assert chunked.teacher_entropy is None
    torch.testing.assert_close(chunked.student_entropy, per_token_entropy(student_logits(heads), TEMPERATURE))
    cap = dense.detach().median().item()
    assert_same_loss_and_gradients(
        heads,
        masked_token_mean(clip_per_token(chunked.values, cap, "scale"), heads["mask"]),
        masked_token_mean(clip_per_token(dense, cap, "scale"), heads["mask"]),
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_sparse_topk_pointwise_clip_equals_dense_sparse(beta):
    heads = make_heads(seed=4)
    teacher_log_probs = torch.log_softmax(teacher_logits(heads) / TEMPERATURE, -1)
    ids = teacher_log_probs.topk(5, dim=-1).indices
    ids[0, 0, 3:] = -1
    log_probs = teacher_log_probs.gather(-1, ids.clamp(min=0))
    chunked = chunked_sparse_topk_divergence(
        heads["student_hidden"], heads["student_weight"], ids, log_probs, beta, TEMPERATURE, chunk_size=CHUNK,
        student_bias=heads["student_bias"], pointwise_cap=0.05,
    )
    dense = sparse_topk_divergence(student_logits(heads), ids, log_probs, beta, TEMPERATURE, pointwise_cap=0.05)
    unclipped = sparse_topk_divergence(student_logits(heads), ids, log_probs, beta, TEMPERATURE)
    torch.testing.assert_close(chunked.clip.unclipped, unclipped.detach(), rtol=1e-5, atol=1e-5)
    assert chunked.clip.clipped_entries.sum() > 0
    assert_same_loss_and_gradients(
        heads, masked_token_mean(chunked.values, heads["mask"]), masked_token_mean(dense, heads["mask"])
    )


def test_chunked_sparse_topk_at_full_vocab_equals_dense_forward_kl():
    heads = make_heads(seed=5)
    teacher_log_probs = torch.log_softmax(teacher_logits(heads) / TEMPERATURE, -1)
    ids = teacher_log_probs.argsort(-1, descending=True)
    chunked = chunked_sparse_topk_divergence(
        heads["student_hidden"],
        heads["student_weight"],
        ids,
        teacher_log_probs.gather(-1, ids),
        0.0,
        TEMPERATURE,
        chunk_size=CHUNK,
        student_bias=heads["student_bias"],
    )
    dense = per_token_divergence(student_logits(heads), teacher_logits(heads), 0.0, TEMPERATURE)
    assert_same_loss_and_gradients(heads, chunked.values.sum(), dense.sum())


def test_chunked_token_log_probs_equal_dense():
    heads = make_heads(seed=6)
    mask = heads["mask"]
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(7))
    tokens_with_padding = tokens.masked_fill(~mask, -100)  # never read at masked positions
    chunked = chunked_token_log_probs(
        heads["student_hidden"],
        heads["student_weight"],
        tokens_with_padding,
        TEMPERATURE,
        mask=mask,
        chunk_size=CHUNK,
        student_bias=heads["student_bias"],
    )
    dense = token_log_probs(student_logits(heads), tokens, TEMPERATURE)
    torch.testing.assert_close(chunked.values[mask], dense[mask], rtol=1e-5, atol=1e-5)
    weights = torch.randn(BATCH, LENGTH, generator=torch.Generator().manual_seed(8))  # e.g. -A_t of sampled OPD
    assert_same_loss_and_gradients(
        heads, masked_token_mean(weights * chunked.values, mask), masked_token_mean(weights * dense, mask)
    )


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    heads = make_heads(seed=9, with_bias=False)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    chunked = chunked_per_token_divergence(
        heads["student_hidden"],
        heads["student_weight"],
        heads["teacher_hidden"],
        heads["teacher_weight"],
        0.0,
        mask=mask,
        chunk_size=CHUNK,
    )
    loss = masked_token_mean(chunked.values, mask)
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, [heads["student_hidden"], heads["student_weight"]])
    assert all(torch.all(grad == 0) for grad in grads)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_never_materialises_full_sequence_logits(beta):
    positions, width, vocab, chunk = 64, 4, 50, 8
    generator = torch.Generator().manual_seed(10)
    student_hidden = torch.randn(positions, width, generator=generator, requires_grad=True)
    student_weight = torch.randn(vocab, width, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(positions, width, generator=generator)
    teacher_weight = torch.randn(vocab, width, generator=generator)
    with LargestTensor() as recorder:
        values = chunked_per_token_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, beta, chunk_size=chunk
        ).values
        clip_per_token(values, 1.0, "scale").mean().backward()
    assert recorder.largest <= chunk * vocab  # the dense path would make [64, 50] logits
    with LargestTensor() as dense_recorder:
        per_token_divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, beta).mean()
    assert dense_recorder.largest >= positions * vocab  # the recorder does see full logits when they exist


def test_default_chunk_size_bounds_the_buffer():
    assert default_chunk_size(151_936) == 55
    assert default_chunk_size(151_936) * 151_936 <= 2**23
    assert default_chunk_size(10**9) == 1


def test_rejects_bad_chunk_size_and_beta():
    heads = make_heads(with_bias=False)
    args = (heads["student_hidden"], heads["student_weight"], heads["teacher_hidden"], heads["teacher_weight"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_per_token_divergence(*args, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        chunked_per_token_divergence(*args, -0.1)
