"""GRPO prompts and rewards: JSONL errors, built-in tasks, resumable batching, the toy tokenizer,
reward functions and RewardSet's error reporting. (File formats, chat templates and TRL's rewards:
tests/test_grpo_datasets.py, tests/test_grpo_trl_rewards.py.)"""

from __future__ import annotations

import random
import sys
import textwrap

import pytest
import torch

from compilepass.core.errors import CompilepassError, ConfigError
from compilepass.standby.grpo.data import (BUILTIN_TASKS, DatasetError, Example, PromptBatcher, PromptDataset,
                                           ToyTokenizer, load_dataset, load_tokenizer)
from compilepass.standby.grpo.rewards import (RewardError, RewardSet, copy_similarity, exact_match, extract_answer,
                                              format_answer_tag, format_think_answer, normalize_answer, repeat_letter,
                                              resolve_reward)

# ---------------------------------------------------------------------------------------- data


def test_jsonl_loads_answers_and_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4", "level": 3}\n'
                 '{"prompt": "free"}\n')
    ds = PromptDataset.from_source(p)
    assert len(ds) == 3 and ds.format == "standard" and ds.column_names == ["answer", "level"]
    assert ds[0] == Example("1+1=", {"answer": "2", "level": None})
    assert ds[1].answer == "4" and ds[1].columns["level"] == 3
    assert ds[2].answer is None
    assert ds.default_rewards == ()


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', "bad.jsonl:2: invalid JSON"),
    ('{"prompt": "a"}\n\n{"question": "b"}\n', 'bad.jsonl:3: "prompt" must be a non-empty string or a list of '
                                                '{role, content} messages; it is missing (null)'),
    ('["prompt"]\n', "bad.jsonl:1: each row must be a JSON object, not list"),
    ('{"prompt": 5}\n', 'bad.jsonl:1: "prompt" must be a non-empty string or a list of {role, content} messages; '
                        'it is int'),
    ('{"prompt": "x", "answer": "1"}\n\n{"prompt": "y", "answer": 2}\n',
     "bad.jsonl:3: column 'answer' holds a number here but a string on line 1; datasets needs one type per column"),
    ('{"prompt": "x"}\n{"prompt": ""}\n', 'bad.jsonl:2: "prompt" must be a non-empty string'),
    ("\n\n", "has no examples"),
    ("", "has no examples"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DatasetError) as e:
        PromptDataset.from_source(p)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError)


def test_missing_dataset_file(tmp_path):
    with pytest.raises(DatasetError, match="dataset file '.*nope.jsonl' not found"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetError, match="unknown built-in task 'x'"):
        load_dataset("builtin:x")


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_builtin_tasks_are_deterministic_by_seed(name):
    a = load_dataset(f"builtin:{name}", seed=1, builtin_size=50)
    b = load_dataset(f"builtin:{name}", seed=1, builtin_size=50)
    c = load_dataset(f"builtin:{name}", seed=2, builtin_size=50)
    assert list(a) == list(b) and a.fingerprint() == b.fingerprint()
    assert list(a) != list(c) and a.fingerprint() != c.fingerprint()
    assert all(ex.prompt and ex.answer for ex in a)
    assert a.default_rewards == BUILTIN_TASKS[name].rewards


def test_arithmetic_answers_are_right():
    for ex in load_dataset("builtin:arithmetic", builtin_size=100):
        expr = ex.prompt.removeprefix("What is ").removesuffix("? Answer: ")
        assert str(eval(expr)) == ex.answer  # noqa: S307 - our own generated "a + b" / "a * b"
        assert exact_match(completions=[f"The result is {ex.answer}."], answer=[ex.answer]) == [1.0]


def take(batcher, n):
    return [[ex.columns["index"] for ex in batcher.next_batch()] for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_batcher_state_round_trip(shuffle):
    ds = load_dataset("builtin:repeat", seed=0, builtin_size=10)
    a = PromptBatcher(ds, 4, shuffle=shuffle, seed=7)
    take(a, 3)  # 12 > 10: crosses into epoch 1
    state = a.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    assert all(isinstance(v, (int, str, bool)) for v in state.values())
    expected = take(a, 5)
    b = PromptBatcher(ds, 4, shuffle=shuffle, seed=7)
    b.load_state_dict(state)
    assert take(b, 5) == expected


def test_batcher_epochs_cover_the_dataset_and_reshuffle():
    ds = load_dataset("builtin:repeat", builtin_size=12)
    b = PromptBatcher(ds, 4, shuffle=True, seed=0)
    e0 = sum(take(b, 3), [])
    e1 = sum(take(b, 3), [])
    assert sorted(e0) == sorted(e1) == list(range(12))
    assert e0 != e1
    assert sum(take(PromptBatcher(ds, 4, shuffle=False), 3), []) == list(range(12))


def test_batcher_refuses_a_changed_dataset():
    state = PromptBatcher(load_dataset("builtin:repeat", seed=0, builtin_size=10), 2).state_dict()
    other = PromptBatcher(load_dataset("builtin:repeat", seed=1, builtin_size=10), 2)
    with pytest.raises(ConfigError, match="checkpoint's fingerprint"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="checkpoint's seed is 0"):
        PromptBatcher(load_dataset("builtin:repeat", seed=0, builtin_size=10), 2, seed=5).load_state_dict(state)


def test_toy_tokenizer_round_trip():
    tok = ToyTokenizer()
    for text in ["Repeat the letter a: ", "héllo wörld ✓\n\t{}", ""]:
        ids = tok.encode(text)
        assert all(3 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    ids = tok.encode("ab") + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "ab<eos><pad><pad>"
    assert tok.encode("\x00\x01") == [tok.unk_token_id] * 2
    assert tok.decode([0xC3]) == "\ufffd"  # a torn UTF-8 sequence does not raise
    assert len({tok.pad_token_id, tok.eos_token_id, tok.unk_token_id}) == 3 and tok.vocab_size == 256


def test_load_tokenizer_preset_and_missing():
    assert isinstance(load_tokenizer("tiny"), ToyTokenizer)
    with pytest.raises(CompilepassError, match="neither a preset"):
        load_tokenizer("/no/such/model")


def test_load_tokenizer_from_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>",
                            unk_token="[UNK]").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [3, 4]
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.decode([3, 4, 1]) == "hello world"


# ---------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("completion, answer, expected", [
    ("so the total is 42", "42", 1.0),
    ("first 3 then 41 and finally 42.", "42", 1.0),
    ("I think 41", "42", 0.0),
    ("reasoning 7 ... #### 1,000", "1000", 1.0),
    ("#### 12\nextra 99", "12", 1.0),
    ("<answer> Paris </answer>", "paris", 1.0),
    ("The answer: 3.50", "3.5", 1.0),
    ("Answer is: -7", "-7", 1.0),
    ("Answer: $12.", "12", 1.0),
    ("no number here", "5", 0.0),
    ("", "5", 0.0),
    ("####", "5", 0.0),
])
def test_exact_match(completion, answer, expected):
    assert exact_match(completions=[completion], answer=[answer]) == [expected]
    assert exact_match(completions=[[{"role": "assistant", "content": completion}]], answer=[answer]) == [expected]


def test_extract_and_normalize():
    assert extract_answer("a 1 b 2") == "2"
    assert extract_answer("nothing") is None
    assert normalize_answer("1,234.0") == "1234" and normalize_answer(" Paris. ") == "paris"
    assert normalize_answer(None) is None


def test_format_rewards():
    comps = ["<answer>4</answer>", "the answer is 4", "<think>hmm</think>\n<answer>4</answer>", "<answer>4"]
    assert format_answer_tag(completions=comps) == [1.0, 0.0, 1.0, 0.0]
    assert format_think_answer(completions=comps, prompts=["p"] * 4, answer=[None] * 4) == [0.0, 0.0, 1.0, 0.0]


def test_toy_task_rewards_have_spread_for_random_bytes():
    rng = random.Random(0)
    comps = ["".join(chr(rng.randint(3, 127)) for _ in range(8)) for _ in range(64)]
    r = repeat_letter(completions=comps, answer=["c"] * 64)
    assert repeat_letter(completions=["cccc", "dddd", ""], answer=["c"] * 3) == [1.0, pytest.approx(1 - 1 / 32), 0.0]
    assert 0.05 < sum(r) / len(r) < 0.5 and len(set(r)) > 10  # random text scores sometimes, unevenly
    assert copy_similarity(completions=["abcd", "ab", "abce!!"], answer=["abcd"] * 3) == [
        1.0, 0.5, pytest.approx(1 - 1 / 128)]


def test_reward_set_weights_and_parts():
    rs = RewardSet.from_specs([("exact_match", 1.0), ("format_answer_tag", 0.5)])
    total, parts = rs.score(["q"] * 3, ["<answer>4</answer>", "4", "5"], columns={"answer": ["4", "4", "4"]})
    assert total.dtype == torch.float32 and total.tolist() == [1.5, 1.0, 0.0]
    assert parts["format_answer_tag"].tolist() == [1.0, 0.0, 0.0]
    assert rs.names == ["exact_match", "format_answer_tag"]
    assert RewardSet.from_specs([], default=("repeat_letter",)).names == ["repeat_letter"]
    with pytest.raises(ConfigError, match="no reward functions"):
        RewardSet.from_specs([])


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(completions, **kwargs):
            return [float(len(c)) for c in completions]

        def uses_column(completions, level, **kwargs):
            return [float(l or 0) for l in level]

        def legacy(prompts, completions, answers, **meta):  # the previous positional convention
            return [float(a == c) for a, c in zip(answers, completions)]

        def boom(completions, **kwargs):
            return [1.0 / (len(c) - 3) for c in completions]

        def short(completions, **kwargs):
            return [1.0]

        def nan(completions, **kwargs):
            return [0.0, float("nan")]

        def text(completions, **kwargs):
            return [0.0, "high"]

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_user_reward_module_function(user_rewards):
    rs = RewardSet.from_specs(["my_rewards:length", ("my_rewards:uses_column", 2.0), "my_rewards:legacy"])
    total, parts = rs.score(["p", "p"], ["ab", "abcd"], columns={"level": [1, None], "answer": ["ab", "x"]})
    assert parts["my_rewards:length"].tolist() == [2.0, 4.0]
    assert parts["my_rewards:uses_column"].tolist() == [1.0, 0.0]
    assert parts["my_rewards:legacy"].tolist() == [1.0, 0.0]  # answers= is the answer column
    assert total.tolist() == [5.0, 4.0]
    # a file path works too
    fn = resolve_reward(f"{user_rewards / 'my_rewards.py'}:length")
    assert fn(completions=["xyz"]) == [3.0]


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("my_rewards:missing", "module 'my_rewards' has no attribute 'missing'"),
    ("my_rewards:NOT_CALLABLE", "'NOT_CALLABLE' in 'my_rewards' is not callable"),
    ("/no/such/file.py:f", "file '/no/such/file.py' not found"),
    ("unknown_builtin", "unknown reward 'unknown_builtin'"),
    ("my_rewards:", "must look like module:function"),
])
def test_user_reward_resolution_errors(user_rewards, spec, needle):
    with pytest.raises(ConfigError) as e:
        resolve_reward(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_reward_error_names_function_sample_and_prompt(user_rewards):
    prompts = ["first prompt", "the failing prompt " + "x" * 200, "third"]
    with pytest.raises(RewardError) as e:
        RewardSet.from_specs(["my_rewards:boom"]).score(prompts, ["abcdef", "abc", "ab"])
    msg = str(e.value)
    assert "reward 'my_rewards:boom' failed on sample 1" in msg and "the failing prompt" in msg
    assert "ZeroDivisionError" in msg and len(msg) < 300 and "\n" not in msg
    assert isinstance(e.value, CompilepassError)

    with pytest.raises(RewardError, match="'my_rewards:short' returned 1 scores for 2 completions"):
        RewardSet.from_specs(["my_rewards:short"]).score(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=r"'my_rewards:nan' returned nan for sample 1 \(prompt 'b'\); return None"):
        RewardSet.from_specs(["my_rewards:nan"]).score(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=r"returned 'high' \(not a number\) for sample 1"):
        RewardSet.from_specs(["my_rewards:text"]).score(["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match="'exact_match' failed on sample 0 .*has none"):
        RewardSet.from_specs(["exact_match"]).score(["a"], ["1"], columns={"answer": [None]})
    with pytest.raises(RewardError, match="reward 'exact_match' needs 'answer', which no dataset column gives "
                                          r"\(columns: level\)"):
        RewardSet.from_specs(["exact_match"]).score(["a"], ["1"], columns={"level": [1]})


def test_reward_error_quotes_the_original_exception(tmp_path, monkeypatch):
    """The batch call's exception is quoted, not the one of the sample-by-sample rerun (which here
    fails differently); the rerun only locates the sample."""
    (tmp_path / "flaky_rewards.py").write_text(textwrap.dedent("""
        calls = []

        def flaky(prompts, completions, **kwargs):
            calls.append(len(completions))
            if len(calls) == 1:
                raise ValueError("the original problem\\nwith a second line")
            raise KeyError("only on the rerun")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(RewardError) as e:
            RewardSet.from_specs(["flaky_rewards:flaky"]).score(["p0", "p1"], ["a", "b"])
    finally:
        sys.modules.pop("flaky_rewards", None)
    msg = str(e.value)
    assert msg == ("reward 'flaky_rewards:flaky' failed on sample 0 (prompt 'p0'): "
                   "ValueError: the original problem with a second line"), msg
    assert "KeyError" not in msg


def test_reward_metric_labels():
    from compilepass.standby.grpo.rewards import metric_labels

    names = ["repeat_letter", "/tmp/x/myrewards.py:contains_answer", "pkg.mod:contains_answer",
             "other:Scorer.contains_answer", "contains_answer_2:f", "m:contains_answer_2"]
    assert metric_labels(names) == {
        "repeat_letter": "repeat_letter", "/tmp/x/myrewards.py:contains_answer": "contains_answer",
        "pkg.mod:contains_answer": "contains_answer_2", "other:Scorer.contains_answer": "contains_answer_3",
        "contains_answer_2:f": "f", "m:contains_answer_2": "contains_answer_2_2"}
    assert RewardSet.from_specs(["exact_match", "format_answer_tag"]).labels == {
        "exact_match": "exact_match", "format_answer_tag": "format_answer_tag"}
