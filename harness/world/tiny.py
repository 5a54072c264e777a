"""Deterministic tiny tokenizer and causal LM for offline tests, the demo and benchmarks.

The tokenizer is a byte-level BPE (like GPT-2 / Qwen) trained on the arithmetic world's own text,
with digits split one per token, wrapped in ``PreTrainedTokenizerFast`` with a ChatML chat template
that carries ``{% generation %}`` markers (so TRL's ``assistant_only_loss`` works). The model is a
small Llama built from a config; both round-trip through ``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness.world.arithmetic import SPLITS, generate_problems, hinted_messages
from trl_opsd.prompts import DEFAULT_TEACHER_PROMPT_TEMPLATE

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _training_corpus() -> list[str]:
    """Every kind of text the world produces: questions, solutions, hints and chat roles."""
    texts = [DEFAULT_TEACHER_PROMPT_TEMPLATE]
    for split in SPLITS:
        for problem in generate_problems(300, split=split, seed=12345):
            texts += ["user\n", "assistant\n", problem.question, problem.solution, hinted_messages(problem)[-1]["content"]]
    return texts


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the world's text; identical bytes on every call."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        chat_template=CHATML_TEMPLATE,
    )
    return wrapped


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for CPU tests; the same weights for the same seed."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float()
