"""lm-eval model ``cortex``: Snowflake Cortex REST models, so a hosted teacher is scored on the same documents.

    trl-opsd eval --model cortex \\
        --model_args model=mistral-large2,account_url=https://<account>.snowflakecomputing.com \\
        --tasks opsd_gsm8k_cot --apply_chat_template --log_samples --output_path runs/teacher

Built on :class:`trl_opsd.teachers.cortex.CortexTeacher` (retries with backoff, bounded concurrency, an
optional on-disk cache). Model arguments: ``model`` and ``account_url`` (required); ``token_type``
(``PROGRAMMATIC_ACCESS_TOKEN`` by default, or ``SESSION``, ``KEYPAIR_JWT``, ``OAUTH``); ``token_env`` /
``token_file`` (default: the variable of that type, e.g. ``SNOWFLAKE_PAT``); ``max_concurrency``,
``timeout_s``, ``max_retries``, ``cache`` (a file path). The credential is read from the environment or the
file, never from the command line, so it never lands in lm-eval's results files; an ``account_url`` carrying
credentials (``https://user:pass@...``, ``?token=...``) is refused for the same reason.

Only ``generate_until`` works: Cortex returns text without log-probabilities, so log-likelihood tasks
(multiple choice, perplexity) raise ``NotImplementedError``. Cortex has no stop sequences either; the
task's ``until`` strings are applied to the returned text. lm-eval knows this model only in a process that
imported this module: ``trl-opsd eval`` does, the stock ``lm_eval`` command does not.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.api_models import JsonChatStr

from trl_opsd import redaction
from trl_opsd.teachers import CortexAuth, CortexTeacher, RetryPolicy

logger = logging.getLogger(__name__)

NO_LOGLIKELIHOOD = (
    "cortex: Snowflake Cortex returns no log-probabilities, so log-likelihood requests (multiple-choice and "
    "perplexity tasks) cannot be scored; use generate_until tasks such as opsd_gsm8k"
)
_USED_GEN_KWARGS = {"until", "max_gen_toks", "temperature", "do_sample"}


def truncate_at(text: str, until: list[str]) -> str:
    """``text`` cut before the first occurrence of any stop string (what a server-side ``stop`` would do)."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


@register_model("cortex")
class CortexLM(LM):
    def __init__(
        self,
        model: str | None = None,
        account_url: str | None = None,
        token_type: str = "PROGRAMMATIC_ACCESS_TOKEN",
        token_env: str | None = None,
        token_file: str | None = None,
        max_concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        cache: str | None = None,
        max_gen_toks: int = 256,
        # lm-eval passes its --batch_size/--max_batch_size/--device to every model; requests go out
        # max_concurrency at a time whatever they say.
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if not model or not account_url:
            raise ValueError(
                "cortex: --model_args needs model=<cortex model> and account_url=https://<account>."
                f"snowflakecomputing.com (got model={model!r}, account_url={account_url!r})"
            )
        if redaction.strip_url_credentials(account_url) != account_url:
            redaction.register_url(account_url)
            raise ValueError(
                f"cortex: account_url {redaction.redact(account_url)} carries credentials, which lm-eval would write "
                "into its results files with the model args; put the token in token_env or token_file instead"
            )
        self.model = model
        self.max_gen_toks = int(max_gen_toks)
        auth = CortexAuth(token_type, env=token_env, file=token_file)
        self.teacher = CortexTeacher(
            account_url, model, auth=auth, max_concurrency=int(max_concurrency), timeout_s=float(timeout_s),
            retry=RetryPolicy(max_retries=int(max_retries)), cache=cache,
        )

    # chat: lm-eval hands the rendered chat back to generate_until; keep it as JSON messages, as its own
    # API models do (lm_eval/models/api_models.py), since Cortex takes messages, not a prompt string.
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> JsonChatStr:
        return JsonChatStr(json.dumps(chat_history, ensure_ascii=False))

    @property
    def tokenizer_name(self) -> str:
        return f"cortex:{self.model}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return ""

    def get_model_info(self) -> dict:
        return {"model_source": "cortex", "model_name": self.model}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One Cortex completion per request; requests that share settings go out together, concurrently."""
        groups: dict[tuple[int, float], list[int]] = defaultdict(list)
        chats, stops, ignored = [], [], set()
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args[0], dict(request.args[1])
            ignored |= set(gen_kwargs) - _USED_GEN_KWARGS
            chats.append(json.loads(context.prompt) if isinstance(context, JsonChatStr)
                         else [{"role": "user", "content": context}])
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            # lm-eval's convention (as in its HF model): greedy unless do_sample is set.
            temperature = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample") else 0.0
            groups[(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), temperature)].append(index)
        if ignored:
            logger.warning("cortex: generation settings Cortex does not take, ignored: %s", ", ".join(sorted(ignored)))
        texts: list[str | None] = [None] * len(requests)
        for (max_tokens, temperature), indices in groups.items():
            generations = self.teacher.generate([chats[i] for i in indices], max_tokens=max_tokens,
                                                temperature=temperature)
            for i, generation in zip(indices, generations):
                texts[i] = truncate_at(generation.text, stops[i])
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
        return texts

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NO_LOGLIKELIHOOD)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NO_LOGLIKELIHOOD)
