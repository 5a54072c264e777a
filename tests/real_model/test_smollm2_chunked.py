"""The chunked loss equals the dense one on SmolLM2's 49,152-token vocabulary, in values and gradients.

Real hidden states: the model reads two GSM8K questions with a worked answer, as the student (question only) and as
the self-teacher (question + "The final answer is N."); the loss is taken at the answer's positions through the
model's own (tied) LM head. Both fp32 paths are held to the same float64 computation of the dense formula: values
within 2e-4 absolute per position, the loss and the gradients (student hidden states, LM head) within 2e-4 relative
(norm of the difference over the norm). fp32 sums over 49k entries are not exact: the chunked path's row dot
products (einsum) round more than the dense path's sums, which the small vocabularies of tests/test_chunked.py
never show.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_opsd.chunked import chunked_per_token_divergence, chunked_token_log_probs
from trl_opsd.losses import masked_token_mean, per_token_divergence, token_log_probs

VALUE_ATOL, RELATIVE = 2e-4, 2e-4
CHUNK = 5  # positions per chunk: divides neither row length nor the batch
ROWS = [("Ava has 7 apples and buys 5 more. How many apples does Ava have now?", "Ava has 7 + 5 = 12 apples.\n#### 12"),
        ("Ben finds 12 marbles every day for 3 days. How many marbles is that in total?",
         "In 3 days Ben finds 12 * 3 = 36 marbles, so the total is 36.\n#### 36")]


def completion_hidden_states(model, tokenizer, with_answer: bool):
    """Final hidden states at the positions that predict each answer token, right-padded, and their mask."""
    states, targets = [], []
    for question, answer in ROWS:
        user = question + (f"\n\nThe final answer is {answer.split('#### ')[1]}." if with_answer else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model.model(torch.tensor([prompt_ids + answer_ids])).last_hidden_state[0]
        states.append(hidden[len(prompt_ids) - 1:-1])
        targets.append(torch.tensor(answer_ids))
    width = max(len(t) for t in targets)
    mask = torch.stack([torch.arange(width) < len(t) for t in targets])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, width - len(x))) if x.dim() == 2 else \
        torch.nn.functional.pad(x, (0, width - len(x)))
    return torch.stack([pad(s) for s in states]), torch.stack([pad(t) for t in targets]), mask


@pytest.fixture(scope="module")
def heads(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    student, token_ids, mask = completion_hidden_states(model, tokenizer, with_answer=False)
    teacher, _, teacher_mask = completion_hidden_states(model, tokenizer, with_answer=True)
    assert torch.equal(mask, teacher_mask) and mask.sum() > 2 * CHUNK
    weight = model.lm_head.weight.detach().clone()
    assert weight.shape == (49152, 576)
    return {"student": student, "teacher": teacher, "weight": weight, "token_ids": token_ids, "mask": mask}


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def loss_and_gradients(values_of, heads, dtype):
    """(per-position values, masked mean, its gradients w.r.t. the student hidden states and the LM head)."""
    hidden = heads["student"].to(dtype).clone().requires_grad_()
    weight = heads["weight"].to(dtype).clone().requires_grad_()
    values = values_of(hidden, weight)
    loss = masked_token_mean(values, heads["mask"])
    return (values[heads["mask"]], loss, *torch.autograd.grad(loss, (hidden, weight)))


def assert_matches_float64(chunked, dense, reference):
    for path in (chunked, dense):
        values, loss, *gradients = path
        torch.testing.assert_close(values.double(), reference[0], rtol=0, atol=VALUE_ATOL)
        assert relative_error(loss, reference[1]) < RELATIVE
        for gradient, exact in zip(gradients, reference[2:]):
            assert exact.abs().max() > 0 and relative_error(gradient, exact) < RELATIVE


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_equals_dense_on_the_real_vocabulary(heads, beta):
    mask, teacher, teacher_weight = heads["mask"], heads["teacher"], heads["weight"]

    def dense(hidden, weight):
        return per_token_divergence(hidden @ weight.T, teacher.to(hidden.dtype) @ teacher_weight.to(hidden.dtype).T,
                                    beta)

    def chunked(hidden, weight):
        return chunked_per_token_divergence(hidden, weight, teacher, teacher_weight, beta, mask=mask,
                                            chunk_size=CHUNK).values

    reference = loss_and_gradients(dense, heads, torch.float64)
    assert reference[0].min() >= 0 and reference[0].max() > 1e-2  # the hint moves the teacher: a real signal
    assert_matches_float64(loss_and_gradients(chunked, heads, torch.float32),
                           loss_and_gradients(dense, heads, torch.float32), reference)


def test_chunked_token_log_probs_equal_dense_on_the_real_vocabulary(heads):
    mask, token_ids = heads["mask"], heads["token_ids"]

    def dense(hidden, weight):
        return token_log_probs(hidden @ weight.T, token_ids)

    def chunked(hidden, weight):
        return chunked_token_log_probs(hidden, weight, token_ids, mask=mask, chunk_size=CHUNK).values

    assert_matches_float64(loss_and_gradients(chunked, heads, torch.float32),
                           loss_and_gradients(dense, heads, torch.float32),
                           loss_and_gradients(dense, heads, torch.float64))
