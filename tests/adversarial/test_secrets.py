"""The secret grep: failing runs must write no secret anywhere -- raw, as an 8+ character fragment, or URL-quoted.

Secrets come from every source the project reads: an environment variable with an innocent name
(``VLLM_BEARER``, named by ``api_key_env`` / ``teacher_api_key_env``), a token file, and credentials inside a
URL. The failing scenarios: a gateway that echoes the request headers into its error body (retried 5xx and
final 4xx), a Cortex stream whose error event echoes the Authorization header, exceptions raised ``from
None`` (their hidden ``__context__`` held the server's text), and a recipe dry run that prints the plan and
writes the manifest. Everything they write is grepped: exception ``str``/``repr``/``traceback`` (chained
causes and contexts included), captured logs of every logger at DEBUG, stdout/stderr, every file under the
test's temporary folder (caches, manifests).
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import sys
import traceback
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from servers import LoopbackServer, TinyLM

from trl_opsd import redaction
from trl_opsd.teachers import CortexAuth, CortexTeacher, OpenAICompatTeacher, ResponseCache, RetryPolicy, TeacherError

API_KEY = "sk-TESTSECRET-7f3a9c2e1d"  # in an environment variable whose name is not secret-like
URL_PASSWORD = "pw/TESTSECRET+8c1d=e5"  # inside a URL: needs quoting, so its quoted forms differ
FILE_TOKEN = "tok-TESTSECRET-file-31c9a7"  # in a token file
SECRETS = (API_KEY, URL_PASSWORD, FILE_TOKEN)
RETRY = RetryPolicy(max_retries=1, base_delay=0.0, max_delay=0.0)
REPO = Path(__file__).resolve().parents[2]


def forms(secret: str) -> set[str]:
    """What a leak may look like: raw, URL-quoted, and every 8-character fragment of each."""
    whole = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    return whole | {w[i : i + 8] for w in whole for i in range(len(w) - 7)}


def leaks(text: str) -> list[str]:
    return sorted({f for secret in SECRETS for f in forms(secret) if f in text})


def exception_texts(err: BaseException) -> str:
    chain, seen, error = [], set(), err
    stack = [err]
    while stack:
        error = stack.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        chain += [str(error), repr(error), *map(str, error.args)]
        stack += [error.__cause__, error.__context__]
    return "\n".join([*chain, *traceback.format_exception(err), *traceback.format_exception(err, chain=True)])


def files_text(folder: Path) -> str:
    """Every file written under ``folder`` (the ``secrets`` folder holding the token file itself excluded)."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(folder.rglob("*"))
                     if p.is_file() and "secrets" not in p.relative_to(folder).parts)


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    return TinyLM(seed=0)


@pytest.fixture
def everything_logged(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "openai", "trl_opsd", "recipes", "harness"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.fixture
def secret_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_BEARER", API_KEY)
    token_file = tmp_path / "secrets" / "cortex.token"
    token_file.parent.mkdir()
    token_file.write_text(FILE_TOKEN + "\n")
    return token_file


def credential_url(server: LoopbackServer, path: str = "") -> str:
    host = server.url.removeprefix("http://")
    return f"http://user:{quote(URL_PASSWORD, safe='')}@{host}{path}"


@pytest.mark.parametrize("credentials", ["bearer", "url"])
@pytest.mark.parametrize("fault", ["echo_headers_400", "echo_headers"])
def test_a_gateway_echoing_the_headers_leaks_nothing(lm, tmp_path, secret_sources, everything_logged, capsys, fault,
                                                     credentials):
    """A final 4xx and exhausted 5xx retries whose body echoes the request headers, raw and URL-quoted: the
    Bearer key from ``api_key_env``, or the Basic credentials httpx builds from the URL's userinfo."""
    with LoopbackServer(lm) as server:
        url = credential_url(server, "/v1") if credentials == "url" else server.url + "/v1"
        teacher = OpenAICompatTeacher(url, server.model_name, server="vllm", api_key_env="VLLM_BEARER", retry=RETRY,
                                      cache=tmp_path / "c.sqlite", sleep=lambda s: None)
        server.inject(*[fault] * 2)
        with pytest.raises(TeacherError) as caught:
            teacher.generate([[{"role": "user", "content": "hi"}]], max_tokens=3, temperature=0.0)
        sent = server.log[-1]["headers"]["authorization"]
        basic = base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode()
        assert sent == (f"Basic {basic}" if credentials == "url" else f"Bearer {API_KEY}")  # the echo holds a secret
        err = caught.value
        assert "<redacted>" in str(err) and basic not in exception_texts(err)
        out = capsys.readouterr()
        written = [exception_texts(err), everything_logged.text, out.out, out.err, files_text(tmp_path),
                   repr(teacher), str(teacher.metrics())]
        assert leaks("\n".join(written)) == []
        assert basic not in "\n".join(written)


def test_a_cortex_error_event_echoing_the_token_leaks_nothing(lm, tmp_path, secret_sources, everything_logged, capsys):
    with LoopbackServer(lm, cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": FILE_TOKEN}) as server:
        teacher = CortexTeacher(server.url, "mistral-large2", auth=CortexAuth.bearer(file=secret_sources),
                                retry=RETRY, cache=tmp_path / "cortex.sqlite", sleep=lambda s: None)
        for fault in ("sse_error_echo", "echo_headers_400"):
            server.inject(fault)
            with pytest.raises(TeacherError) as caught:
                teacher.generate([[{"role": "user", "content": "hi"}]], max_tokens=3, temperature=0.0)
            assert "<redacted>" in str(caught.value)  # the echo reached the message, redacted
            out = capsys.readouterr()
            written = [exception_texts(caught.value), everything_logged.text, out.out, out.err, files_text(tmp_path),
                       repr(teacher), repr(teacher.auth)]
            assert leaks("\n".join(written)) == []


def test_exceptions_raised_from_none_lose_their_hidden_context():
    redaction.register(API_KEY)

    def fail():
        try:
            raise ValueError(f"server said: bad key {API_KEY}")
        except ValueError:
            raise TeacherError(f"request failed with {API_KEY}") from None

    with pytest.raises(TeacherError) as caught:
        fail()
    assert caught.value.__context__ is not None  # what Python keeps despite "from None"
    err = redaction.scrub_exception(caught.value)
    assert err.__context__ is None and leaks(exception_texts(err)) == []
    # a visible cause is kept, redacted
    cause = KeyError(f"key {quote(API_KEY)}")
    shown = RuntimeError("outer")
    shown.__cause__ = cause
    redaction.scrub_exception(shown)
    assert shown.__cause__ is not None and leaks(exception_texts(shown)) == []


def test_fragments_and_quoted_forms_are_redacted():
    redaction.register(URL_PASSWORD)
    texts = [URL_PASSWORD, URL_PASSWORD[:12], URL_PASSWORD[5:], quote(URL_PASSWORD, safe=""), quote_plus(URL_PASSWORD),
             f"x{URL_PASSWORD[:9]}\n{URL_PASSWORD[9:]}y", json.dumps({"k": URL_PASSWORD})]
    for text in texts:
        assert leaks(redaction.redact(text)) == [], text
    assert redaction.redact("https://bob:hunter2-pass@example.com/v1?api_key=abcdef123&model=x") == (
        "https://<redacted>@example.com/v1?api_key=<redacted>&model=x"
    )


def test_a_cache_never_stores_a_secret(tmp_path):
    redaction.register(API_KEY)
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put("k", {"text": f"the key is {API_KEY}"})
    assert cache.get("k") is None
    cache.close()
    assert leaks(files_text(tmp_path)) == []


def _recipes():
    """The recipes package, wherever it lives (``recipes/`` or ``harness/recipes/``)."""
    sys.path.insert(0, str(REPO))
    for package in ("recipes", "harness.recipes"):
        try:
            return importlib.import_module(f"{package}.opd"), importlib.import_module(f"{package}.common")
        except ImportError:
            continue
    pytest.skip("no recipes package")


def test_recipe_dry_run_writes_and_prints_no_secret(tmp_path, secret_sources, everything_logged, capsys, monkeypatch):
    """The key sits in ``teacher_api_base`` (path and query) and behind ``teacher_api_key_env=VLLM_BEARER``."""
    opd, common = _recipes()
    config = next((REPO / d / "configs" / "opd_arith_cpu.yaml" for d in ("recipes", "harness/recipes")
                   if (REPO / d / "configs" / "opd_arith_cpu.yaml").is_file()))
    base = f"http://user:{quote(URL_PASSWORD, safe='')}@127.0.0.1:9/{API_KEY}/v1?api_key={quote(API_KEY)}"
    argv = ["opd.py", "--config", str(config), "--dry_run", "--output_dir", str(tmp_path / "out"),
            "--teacher_model_name_or_path", "", "--teacher_api_base", base, "--teacher_api_model", "served",
            "--teacher_api_key_env", "VLLM_BEARER", "--divergence", "topk", "--teacher_top_k", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    assert opd.main(argv[1:]) == 0
    manifest = tmp_path / "out" / common.DRY_RUN_MANIFEST_NAME
    assert manifest.is_file() and "<redacted>" in manifest.read_text()
    out = capsys.readouterr()
    assert "<redacted>" in out.out  # the plan was printed, redacted
    assert leaks("\n".join([files_text(tmp_path), out.out, out.err, everything_logged.text])) == []


def test_rs_sft_against_a_gateway_echoing_the_key_prints_and_writes_no_secret(lm, tmp_path, secret_sources,
                                                                              everything_logged, capsys):
    """``trl-opsd rs-sft`` with an API teacher whose gateway answers 400 with the request headers in the body."""
    import argparse

    from harness.world import rs_sft  # what `trl-opsd rs-sft` runs

    parser = argparse.ArgumentParser()
    rs_sft.add_arguments(parser)
    with LoopbackServer(lm) as server:
        args = parser.parse_args([
            "--out", str(tmp_path / "rs"), "--num-prompts", "2", "--samples", "1", "--sampler", "teacher",
            "--teacher-url", server.url + "/v1", "--teacher-backend", "vllm", "--teacher-model", server.model_name,
            "--teacher-api-key-env", "VLLM_BEARER", "--teacher-http-cache", str(tmp_path / "rs" / "http.sqlite"),
            "--judge", "none", "--filter", "verifier", "--max-new-tokens", "4",
        ])
        server.inject(*["echo_headers_400"] * 4)
        with pytest.raises(TeacherError) as caught:
            rs_sft.run(args)
        assert API_KEY in json.dumps(server.log[-1]["headers"])
    out = capsys.readouterr()
    written = [exception_texts(caught.value), everything_logged.text, out.out, out.err, files_text(tmp_path)]
    assert "<redacted>" in str(caught.value) and leaks("\n".join(written)) == []


def test_lm_eval_cortex_model_refuses_credentials_in_its_url():
    """lm-eval writes model args into its results files: a URL with credentials is refused, without echoing them."""
    from harness.cortex_lm import CortexLM

    for url in (f"https://user:{quote(URL_PASSWORD, safe='')}@acct.snowflakecomputing.com",
                f"https://acct.snowflakecomputing.com/?token={API_KEY}"):
        with pytest.raises(ValueError, match="carries credentials") as caught:
            CortexLM(model="mistral-large2", account_url=url)
        assert leaks(exception_texts(caught.value)) == []

