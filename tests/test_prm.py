"""PRM judge: segmentation, strict reply parsing, bounded retry, the judge cache and ensembles.

The judge always talks to a loopback chat-completions server (``harness.world.stub_judge.StubJudgeServer``) through
the real ``openai`` client in ``OpenAICompatTeacher``; call counts are the server's own request counters.
"""

from __future__ import annotations

import itertools
import json
import re
import threading

import pytest

from harness.prm import (
    DEFAULT_RUBRIC,
    PRMJudge,
    ReplyFormatError,
    aggregate,
    judge_messages,
    parse_judge_messages,
    parse_reply,
    split_steps,
)
from harness.world.stub_judge import STUB_MODEL, StubJudgeServer, arithmetic_step_verdicts, stub_judge_reply
from trl_opsd.teachers import OpenAICompatTeacher, RetryPolicy

CHAT = "/v1/chat/completions"
QUESTION = "Mia has 12 apples. She buys 7 more apples. She gives away 5 apples. How many apples does Mia have now?"
RIGHT = "12+7=19\n19-5=14\n#### 14"
WRONG = "12+7=19\n19-5=13\n#### 13"  # second line miscalculated


def teacher_for(server: StubJudgeServer, **kwargs) -> OpenAICompatTeacher:
    return OpenAICompatTeacher(f"{server.url}/v1", STUB_MODEL, server="openai", retry=RetryPolicy(max_retries=1),
                               sleep=lambda s: None, timeout_s=10.0, **kwargs)


@pytest.fixture()
def stub():
    with StubJudgeServer() as server:
        yield server


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, steps", [
    # equation-per-line solutions: one step per line, the final-answer line on its own
    ("12+7=19\n19-5=14\n#### 14", ["12+7=19", "19-5=14", "#### 14"]),
    # decimals and thousands separators are not sentence ends
    ("The price is $3.50 each. He buys 1,000 pens. Total: 3,500.00 dollars.",
     ["The price is $3.50 each.", "He buys 1,000 pens.", "Total: 3,500.00 dollars."]),
    # calculator annotations hold '.', '=' and digits; never split inside them
    ("She pays 2.5*4 = <<2.5*4=10.0>>10.0 dollars. Then 10.0/2 = <<10.0/2=5.0>>5.0 each.\n#### 5",
     ["She pays 2.5*4 = <<2.5*4=10.0>>10.0 dollars.", "Then 10.0/2 = <<10.0/2=5.0>>5.0 each.", "#### 5"]),
    # numbered steps inline and on lines; a bare marker joins the step after it
    ("1. Add 3 and 4 to get 7. 2. Double it to get 14.", ["1. Add 3 and 4 to get 7.", "2. Double it to get 14."]),
    ("Step 1:\n6+1=7\nStep 2: 7*2=14", ["Step 1: 6+1=7", "Step 2: 7*2=14"]),
    # bullet lists and blank lines
    ("- first item\n- second item\n\nSo the answer is 5.", ["- first item", "- second item", "So the answer is 5."]),
    # no punctuation at all: one step
    ("add three and four then double the result", ["add three and four then double the result"]),
    # hard-wrapped prose joins; a blank line separates
    ("We add the apples\nand the pears.\n\nThen we stop.", ["We add the apples and the pears.", "Then we stop."]),
    # '#### N' starts its own step even inline, and keeps its decimal
    ("so she has 3.5 kg #### 3.5", ["so she has 3.5 kg", "#### 3.5"]),
    # abbreviations and a lowercase continuation are not sentence ends
    ("Mr. Smith has 3 cats, e.g. Tom. He feeds them.", ["Mr. Smith has 3 cats, e.g. Tom.", "He feeds them."]),
    ("Windows\r\nline endings\r\n\r\n#### 2", ["Windows line endings", "#### 2"]),
    ("", []),
    ("  \n\n ", []),
])
def test_split_steps_on_tricky_inputs(text, steps):
    assert split_steps(text) == steps
    assert split_steps(text) == split_steps(text)  # deterministic


def test_split_steps_never_breaks_a_number_or_annotation():
    text = ("Tom earns 1,234.56 dollars. He spends 0.5 of it: 1,234.56*0.5 = <<1234.56*0.5=617.28>>617.28. "
            "1. Then 617.28-17.28=600.\n2) Finally 600/3 = 200.\n#### 200")
    steps = split_steps(text)
    atoms = re.findall(r"<<[^>]*>>|\d[\d,]*(?:\.\d+)?", text)
    for atom in atoms:
        assert any(atom in step for step in steps), atom
    assert steps[-1] == "#### 200" and len(steps) == 5


# --------------------------------------------------------------------------------------------
# prompt and reply format
# --------------------------------------------------------------------------------------------


def test_judge_prompt_round_trips_for_the_stub():
    steps = ["12+7=19", "a step\nwith a newline", "#### 14"]
    messages = judge_messages("RUBRIC", QUESTION, steps, probabilities=True)
    assert messages[0] == {"role": "system", "content": "RUBRIC"}
    question, parsed, probabilities = parse_judge_messages(messages)
    assert (question, parsed, probabilities) == (QUESTION, ["12+7=19", "a step with a newline", "#### 14"], True)
    assert parse_judge_messages(judge_messages("R", QUESTION, steps))[2] is False


@pytest.mark.parametrize("reply, values", [
    ('{"steps": [1, 0, 1]}', [1.0, 0.0, 1.0]),
    ('  \n{"steps":[1,1,0]}\n', [1.0, 1.0, 0.0]),
    ('```json\n{"steps": [0, 0, 1]}\n```', [0.0, 0.0, 1.0]),
    ('{"steps": [1.0, 0, 1]}', [1.0, 0.0, 1.0]),
])
def test_parse_reply_accepts_exactly_the_format(reply, values):
    assert parse_reply(reply, 3) == values


@pytest.mark.parametrize("reply, why", [
    ('{"steps": [1, 0]}', "2 values but there are 3"),
    ('{"steps": [1, 0, 1, 1]}', "4 values"),
    ('{"steps": [1, 2, 0]}', "not 0 or 1"),
    ('{"steps": [1, 0.5, 0]}', "not 0 or 1"),
    ('{"steps": [true, false, true]}', "not 0 or 1"),
    ('{"steps": ["1", "0", "1"]}', "not 0 or 1"),
    ('{"steps": [1, 0, 1], "reason": "x"}', "single key"),
    ('[1, 0, 1]', "single key"),
    ('{"steps": "101"}', "must be a list"),
    ('Step 1: 1\nStep 2: 0\nStep 3: 1', "not a JSON object"),
    ('{"steps": [1, 0, 1]} I hope this helps', "not a JSON object"),
    ('', "not a JSON object"),
])
def test_parse_reply_rejects_everything_else(reply, why):
    with pytest.raises(ReplyFormatError, match=re.escape(why)):
        parse_reply(reply, 3)


def test_parse_reply_probabilities():
    assert parse_reply('{"steps": [0.9, 0.25, 1]}', 3, probabilities=True) == [0.9, 0.25, 1.0]
    for bad in ('{"steps": [0.9, 1.5, 1]}', '{"steps": [0.9, -0.1, 1]}', '{"steps": [0.9, NaN, 1]}'):
        with pytest.raises(ReplyFormatError):
            parse_reply(bad, 3, probabilities=True)


def test_aggregations():
    assert aggregate([1, 0, 1], "min") == 0.0
    assert aggregate([1, 0, 1], "mean") == pytest.approx(2 / 3)
    assert aggregate([1, 0, 1], "last") == 1.0
    assert aggregate([0.9, 0.5, 0.8], "product") == pytest.approx(0.36)
    assert aggregate([], "mean") == 0.0
    with pytest.raises(ValueError):
        aggregate([1.0], "max")


def test_stub_verdicts_check_arithmetic_and_the_chain():
    assert arithmetic_step_verdicts(["12+7=19", "19-5=14", "#### 14"]) == [1, 1, 1]
    assert arithmetic_step_verdicts(["12+7=19", "19-5=13", "#### 13"]) == [1, 0, 1]  # answer matches line 2
    assert arithmetic_step_verdicts(["12+7=19", "18-5=13", "#### 14"]) == [1, 0, 0]  # broken chain, wrong answer
    assert arithmetic_step_verdicts(["3*4=12", "12/5=2.4", "#### 2.4"]) == [1, 1, 1]
    assert arithmetic_step_verdicts(["#### 5", "so the answer is 5"]) == [0, 0]  # nothing to check against
    # the stub does not read the question: a consistent solution from a wrong start passes every step
    assert arithmetic_step_verdicts(["13+7=20", "#### 20"]) == [1, 1]


# --------------------------------------------------------------------------------------------
# the judge against the loopback server
# --------------------------------------------------------------------------------------------


def test_judge_scores_steps_through_the_wire(stub, tmp_path):
    judge = PRMJudge(teacher_for(stub), cache=tmp_path / "judge.sqlite")
    right, wrong = judge.judge_many([(QUESTION, split_steps(RIGHT)), (QUESTION, split_steps(WRONG))])
    assert right.verdicts == (1, 1, 1) and wrong.verdicts == (1, 0, 1)
    assert wrong.scores() == {"min": 0.0, "mean": pytest.approx(2 / 3), "last": 1.0}
    assert stub.counts[CHAT] == 2
    body = stub.bodies[0]
    assert body["model"] == STUB_MODEL and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": DEFAULT_RUBRIC}
    assert {"[2] 19-5=14" in b["messages"][1]["content"] for b in stub.bodies} == {True, False}


def test_reaggregation_and_a_second_run_cost_zero_calls(stub, tmp_path):
    db = tmp_path / "judge.sqlite"
    items = [(QUESTION, split_steps(t)) for t in (RIGHT, WRONG, "12+7=19\n#### 19")]
    first = PRMJudge(teacher_for(stub), cache=db)
    results = first.judge_many(items)
    calls = stub.total_requests
    assert calls == 3
    for how in ("min", "mean", "last", "product"):  # re-aggregation reads stored verdicts
        [r.score(how) for r in results]
        assert [r.score(how) for r in first.judge_many(items)] == [r.score(how) for r in results]
    assert stub.total_requests == calls and first.metrics()["cache_hits"] == 3 * 4
    second = PRMJudge(teacher_for(stub), cache=db)  # a new process on the same cache file
    again = second.judge_many(items)
    assert stub.total_requests == calls
    assert [r.verdicts for r in again] == [r.verdicts for r in results] and all(r.from_cache for r in again)
    assert second.metrics()["requests"] == 0


def test_rubric_model_or_steps_change_invalidates(stub, tmp_path):
    db = tmp_path / "judge.sqlite"
    steps = split_steps(RIGHT)
    PRMJudge(teacher_for(stub), cache=db).judge(QUESTION, steps)
    assert stub.total_requests == 1
    PRMJudge(teacher_for(stub), rubric=DEFAULT_RUBRIC + " Be lenient.", cache=db).judge(QUESTION, steps)
    assert stub.total_requests == 2
    assert stub.bodies[-1]["messages"][0]["content"].endswith("Be lenient.")
    PRMJudge(teacher_for(stub), cache=db, judge_model="another-judge").judge(QUESTION, steps)
    assert stub.total_requests == 3
    PRMJudge(teacher_for(stub), cache=db).judge(QUESTION, steps[:2])
    assert stub.total_requests == 4
    PRMJudge(teacher_for(stub), cache=db).judge(QUESTION, steps)  # the original: still cached
    assert stub.total_requests == 4


def test_identical_rollouts_in_a_batch_are_asked_once(stub, tmp_path):
    judge = PRMJudge(teacher_for(stub), cache=tmp_path / "j.sqlite")
    results = judge.judge_many([(QUESTION, split_steps(RIGHT))] * 5 + [(QUESTION, [])])
    assert stub.total_requests == 1
    assert [r.verdicts for r in results[:5]] == [(1, 1, 1)] * 5
    assert results[5].score("min") == 0.0 and not results[5].ok  # no steps: nothing to judge, scores 0


class Scripted:
    """A responder that answers from a fixed list of replies in order (thread-safe)."""

    def __init__(self, replies):
        self.replies = itertools.cycle(replies) if isinstance(replies, list) else replies
        self.lock = threading.Lock()

    def __call__(self, body):
        with self.lock:
            return next(self.replies)


def test_unparseable_reply_gets_a_corrective_retry(tmp_path):
    replies = iter(["Step 1 is right, step 2 is right.", '{"steps": [1, 1, 0]}'])
    with StubJudgeServer(Scripted(replies)) as server:
        judge = PRMJudge(teacher_for(server), cache=tmp_path / "j.sqlite", max_retries=2)
        result = judge.judge(QUESTION, split_steps(RIGHT))
        assert result.verdicts == (1, 1, 0) and result.failed_samples == 0
        assert server.total_requests == 2 and judge.metrics()["retries"] == 1
        retry = server.bodies[1]["messages"]
        assert retry[2] == {"role": "assistant", "content": "Step 1 is right, step 2 is right."}
        assert "not a JSON object" in retry[3]["content"] and "exactly 3 values" in retry[3]["content"]


def test_retry_is_bounded_and_a_failure_scores_zero_and_is_cached(tmp_path):
    with StubJudgeServer(Scripted(['{"steps": [1]}'])) as server:
        db = tmp_path / "j.sqlite"
        judge = PRMJudge(teacher_for(server), cache=db, max_retries=2)
        result = judge.judge(QUESTION, split_steps(RIGHT))
        assert server.total_requests == 3  # the first try and two retries, then it stops
        assert not result.ok and result.failed_samples == 1 and result.verdicts is None
        assert result.scores(("min", "mean", "last")) == {"min": 0.0, "mean": 0.0, "last": 0.0}
        assert judge.metrics()["unjudged"] == 1
        PRMJudge(teacher_for(server), cache=db, max_retries=2).judge(QUESTION, split_steps(RIGHT))
        assert server.total_requests == 3
        PRMJudge(teacher_for(server), cache=tmp_path / "other.sqlite", max_retries=0).judge(QUESTION, ["1+1=2"])
        assert server.total_requests == 4


def test_ensemble_majority_vote_per_step(tmp_path):
    replies = ['{"steps": [1, 0, 1]}', '{"steps": [1, 1, 0]}', '{"steps": [0, 1, 1]}']
    with StubJudgeServer(Scripted(replies)) as server:
        judge = PRMJudge(teacher_for(server), cache=tmp_path / "j.sqlite", samples=3, temperature=0.5)
        result = judge.judge(QUESTION, split_steps(RIGHT))
        assert server.total_requests == 3 and {b["temperature"] for b in server.bodies} == {0.5}
        assert sorted(result.samples) == sorted([(1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)])
        assert result.verdicts == (1, 1, 1)  # each step has two votes of three
        assert result.score("min") == 1.0
    with StubJudgeServer(Scripted(replies[:2])) as server:  # two votes: a 1-1 tie counts as 0
        judge = PRMJudge(teacher_for(server), cache=tmp_path / "j.sqlite", samples=2, temperature=0.5)
        assert judge.judge(QUESTION, split_steps(RIGHT)).verdicts == (1, 0, 0)


def test_ensemble_with_one_bad_sample_retries_only_that_sample(tmp_path):
    replies = iter(['{"steps": [1, 1, 1]}', "garbage", '{"steps": [1, 1, 1]}', '{"steps": [1, 1, 0]}'])
    with StubJudgeServer(Scripted(replies)) as server:
        judge = PRMJudge(teacher_for(server, max_concurrency=1), cache=tmp_path / "j.sqlite", samples=3,
                         temperature=0.5)
        result = judge.judge(QUESTION, split_steps(RIGHT))
        assert server.total_requests == 4 and len(result.samples) == 3 and result.verdicts == (1, 1, 1)


def test_probability_judge_and_product(tmp_path):
    with StubJudgeServer(Scripted(['{"steps": [0.9, 0.5, 0.8]}'])) as server:
        judge = PRMJudge(teacher_for(server), cache=tmp_path / "j.sqlite", probabilities=True)
        result = judge.judge(QUESTION, split_steps(RIGHT))
        assert "probability" in server.bodies[0]["messages"][1]["content"]
        assert result.probabilities == (0.9, 0.5, 0.8) and result.verdicts == (1, 1, 1)
        assert result.score("product") == pytest.approx(0.36) and result.score("min") == pytest.approx(0.5)


def test_stub_answers_probability_prompts(stub, tmp_path):
    judge = PRMJudge(teacher_for(stub), cache=tmp_path / "j.sqlite", probabilities=True)
    assert judge.judge(QUESTION, split_steps(WRONG)).probabilities == (1.0, 0.0, 1.0)
    assert json.loads(stub_judge_reply({"messages": judge_messages("r", "q", ["1+1=2"])})) == {"steps": [1]}


def test_secrets_stay_out_of_the_judge_cache_and_repr(stub, tmp_path, monkeypatch):
    secret = "sk-judge-SECRET-0d9f8e7c"
    monkeypatch.setenv("JUDGE_KEY", secret)
    judge = PRMJudge(teacher_for(stub, api_key_env="JUDGE_KEY"), cache=tmp_path / "j.sqlite")
    judge.judge(QUESTION, split_steps(RIGHT))
    assert stub.total_requests == 1
    judge.cache.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("j.sqlite*"))
    assert secret.encode() not in stored
    assert secret not in repr(judge) and secret not in json.dumps(judge.describe())
