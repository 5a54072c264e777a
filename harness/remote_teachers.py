"""The one factory of teachers behind an API: OpenAI-compatible servers (vLLM, OpenAI) and Snowflake Cortex.

Recipes (OPD's server teacher), the PRM judge and the RS-SFT text sampler all build their teacher here.
Secrets come from an environment variable or a file, never from the command line.
"""

from __future__ import annotations

import argparse
import os

from trl_opsd.teachers import Teacher

TEXT_BACKENDS = ("openai", "vllm", "cortex-openai", "cortex")


def remote_teacher(url: str, model: str, backend: str = "openai", *, api_key_env: str | None = None,
                   api_key_file: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                   max_concurrency: int = 8, student_tokenizer=None) -> Teacher:
    """A teacher served at ``url``; ``backend`` is one of :data:`TEXT_BACKENDS` (the wire format).
    ``student_tokenizer`` maps the server's tokens to the student's ids (needed to score tokens)."""
    from trl_opsd.teachers import CortexAuth, CortexTeacher, OpenAICompatTeacher

    if backend not in TEXT_BACKENDS:
        raise ValueError(f"backend must be one of {TEXT_BACKENDS}, got {backend!r}")
    if backend == "cortex":
        auth = CortexAuth.bearer(env=api_key_env or "SNOWFLAKE_PAT", file=api_key_file)
        return CortexTeacher(url, model, auth=auth, cache=cache, max_concurrency=max_concurrency)
    if backend == "cortex-openai":
        return OpenAICompatTeacher.for_cortex(url, model, pat_env=api_key_env or "SNOWFLAKE_PAT", pat_file=api_key_file,
                                              cache=cache, max_concurrency=max_concurrency)
    return OpenAICompatTeacher(url, model, student_tokenizer=student_tokenizer, server=backend,
                               api_key_env=api_key_env, api_key_file=api_key_file, cache=cache,
                               max_concurrency=max_concurrency)


def add_text_teacher_arguments(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    """``--{prefix}-url/-backend/-api-key-env/-api-key-file/-http-cache/-concurrency`` for a remote text
    teacher (the model flag is added by the caller: the judge may take several)."""
    parser.add_argument(f"--{prefix}-url", default=None, help=f"{what}: base URL (OpenAI-compatible: including "
                        "/v1; Cortex: the account URL)")
    parser.add_argument(f"--{prefix}-backend", choices=TEXT_BACKENDS, default="openai",
                        help=f"{what}: wire format (default: %(default)s)")
    parser.add_argument(f"--{prefix}-api-key-env", default=None,
                        help=f"{what}: environment variable holding the API key / token (never logged)")
    parser.add_argument(f"--{prefix}-api-key-file", default=None, help=f"{what}: file holding the API key / token")
    parser.add_argument(f"--{prefix}-http-cache", default=None, help=f"{what}: SQLite cache of raw HTTP responses")
    parser.add_argument(f"--{prefix}-concurrency", type=int, default=8, help=f"{what}: requests in flight")


def remote_teacher_from_args(args: argparse.Namespace, prefix: str, model: str) -> Teacher:
    """:func:`remote_teacher` from the :func:`add_text_teacher_arguments` flags."""
    opt = lambda name: getattr(args, f"{prefix}_{name}")  # noqa: E731
    if not opt("url"):
        raise SystemExit(f"--{prefix}-url is required")
    return remote_teacher(opt("url"), model, opt("backend"), api_key_env=opt("api_key_env"),
                          api_key_file=opt("api_key_file"), cache=opt("http_cache"),
                          max_concurrency=opt("concurrency"))
