"""A real tiny language model and tokenizer, built in code, for the loopback servers and their tests.

The tokenizer is a ``tokenizers`` WordLevel model over a small word vocabulary (whitespace split, a BOS
post-processor like Llama's) wrapped in ``PreTrainedTokenizerFast``; the model is a randomly initialised
2-layer ``LlamaForCausalLM``. Everything is deterministic on CPU in fp32.
"""

from __future__ import annotations

import threading

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "0 1 2 3 4 5 6 7 8 9 + - * = ? . , : the a an answer is what so then plus minus times equals "
    "hint step first next total left right tom has apples gives eats buys more fewer each"
).split()


def build_tokenizer(permuted: bool = False) -> PreTrainedTokenizerFast:
    """The student tokenizer; ``permuted=True`` gives the same words under different ids (a mismatch)."""
    words = list(reversed(WORDS)) if permuted else WORDS
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


class TinyLM:
    """The model plus the two things a server needs: next-token log-probs and greedy/sampled decoding."""

    def __init__(self, seed: int = 0, permuted_tokenizer: bool = False) -> None:
        tokenizer = build_tokenizer(permuted=permuted_tokenizer)
        self._setup(build_model(len(tokenizer), seed=seed), tokenizer)

    @classmethod
    def wrap(cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> TinyLM:
        """Serve another causal LM (e.g. a trained teacher for an end-to-end run) through the same servers."""
        lm = cls.__new__(cls)
        lm._setup(model.eval(), tokenizer)
        return lm

    def _setup(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model, self.tokenizer = model, tokenizer
        # tokenizer.decode([id]) for every id, as vLLM reports single tokens; precomputed because servers ask often.
        self.decoded = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        self._lock = threading.Lock()  # one forward at a time keeps results bitwise reproducible

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @torch.no_grad()
    def next_token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), V]``: row ``i`` is log p(next token | ids[: i + 1])."""
        with self._lock:
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def generate(self, ids: list[int], max_tokens: int, temperature: float, seed: int = 0) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for _ in range(max_tokens):
            row = self.next_token_logprobs(ids + out)[-1]
            if temperature <= 0:
                nxt = int(row.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(row / temperature, -1), 1, generator=generator))
            out.append(nxt)
            if nxt == self.tokenizer.eos_token_id:
                break
        return out

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A trivial chat template: the contents joined by spaces, with BOS."""
        return self.tokenizer(" ".join(m["content"] for m in messages))["input_ids"]
