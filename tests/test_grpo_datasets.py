"""GRPO data through Hugging Face datasets: every file format and saved folder, Dataset objects, the
content fingerprint and the resumable position, TRL's conversational format rendered with a real
tokenizer's chat template, and one-line errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from tiny_chat_model import make_chat_model_dir, make_chat_tokenizer

from compilepass.core.errors import ConfigError
from compilepass.standby.grpo.config import default_config, load_config
from compilepass.standby.grpo.data import DatasetError, HFTokenizer, PromptBatcher, PromptDataset, load_dataset
from compilepass.standby.grpo.prompts import check_tokenizer, completions_in_format, encode_prompt

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i), "level": i % 3} for i in range(10)]
CHAT_ROWS = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i} + {i}?"}],
              "solution": str(2 * i)} for i in range(6)]


def rows_of(ds: PromptDataset) -> list[dict]:
    return [{"prompt": ex.prompt, **ex.columns} for ex in ds]


def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    """ROWS in each format the loader reads."""
    base = datasets.Dataset.from_list(ROWS)
    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS, indent=1))
    paths["parquet"] = tmp_path / "d.parquet"
    base.to_parquet(str(paths["parquet"]))
    paths["csv"] = tmp_path / "d.csv"
    base.to_csv(str(paths["csv"]), index=False)
    base.save_to_disk(str(tmp_path / "saved"))
    paths["saved"] = tmp_path / "saved"
    paths["arrow"] = tmp_path / "d.arrow"
    paths["arrow"].write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    datasets.DatasetDict({"train": base, "test": base.select(range(3))}).save_to_disk(str(tmp_path / "saved_dict"))
    paths["saved_dict"] = tmp_path / "saved_dict"
    return paths


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_all_formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow", "saved", "saved_dict"])
def test_every_format_reads_the_same_rows(formats, kind):
    ds = load_dataset(str(formats[kind]))
    expected = ROWS if kind != "csv" else [{**r, "answer": int(r["answer"])} for r in ROWS]  # CSV infers ints
    assert rows_of(ds) == expected
    assert ds.format == "standard" and ds.column_names == ["answer", "level"] and ds.name == str(formats[kind])
    if kind != "csv":  # same content, same fingerprint, whatever file it came from
        assert ds.fingerprint() == load_dataset(datasets.Dataset.from_list(ROWS)).fingerprint()


def test_saved_dataset_dict_split(formats):
    assert len(load_dataset(str(formats["saved_dict"]), split="test")) == 3
    with pytest.raises(DatasetError, match=r"saved_dict'.*has no split 'dev' \(splits: train, test\); set data.split"):
        load_dataset(str(formats["saved_dict"]), split="dev")


def test_python_objects():
    base = datasets.Dataset.from_list(ROWS)
    assert rows_of(load_dataset(base)) == ROWS
    assert rows_of(load_dataset(datasets.DatasetDict({"train": base}))) == ROWS
    assert rows_of(load_dataset(ROWS)) == ROWS  # a list of row dicts
    ds = load_dataset(base)
    assert load_dataset(ds) is ds
    with pytest.raises(DatasetError, match="IterableDataset cannot be resumed"):
        load_dataset(base.to_iterable_dataset())
    with pytest.raises(DatasetError, match="must be a datasets.Dataset, a DatasetDict or a list of row dicts, not int"):
        load_dataset(3)
    with pytest.raises(DatasetError, match='has no "prompt" column \\(columns: question\\)'):
        load_dataset([{"question": "x"}])


def test_fingerprint_is_the_same_in_another_process_and_follows_every_column(formats, tmp_path):
    here = load_dataset(str(formats["parquet"])).fingerprint()
    code = (f"from compilepass.standby.grpo.data import load_dataset; "
            f"print(load_dataset({str(formats['parquet'])!r}).fingerprint())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                "HF_DATASETS_CACHE": str(tmp_path / "cache")})  # a fresh cache, too
    assert there.returncode == 0, there.stderr
    assert there.stdout.strip() == here
    changed = [dict(r) for r in ROWS]
    changed[7]["level"] = 99  # a column no prompt shows
    assert load_dataset(changed).fingerprint() != here
    assert load_dataset([{k: r[k] for k in ("level", "answer", "prompt")} for r in ROWS]).fingerprint() != here


def test_resume_position_of_a_file_dataset(formats, tmp_path):
    """The data position saved after some batches, restored into a batcher over a fresh load of the
    same file, draws the same next batches; a changed file is refused."""
    a = PromptBatcher(load_dataset(str(formats["jsonl"])), 4, shuffle=True, seed=3)
    for _ in range(3):  # 12 > 10 rows: into epoch 1
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint's trainer_state holds, round-tripped
    expected = [[ex.prompt for ex in a.next_batch()] for _ in range(4)]
    b = PromptBatcher(load_dataset(str(formats["jsonl"])), 4, shuffle=True, seed=3)
    b.load_state_dict(state)
    assert [[ex.prompt for ex in b.next_batch()] for _ in range(4)] == expected
    edited = tmp_path / "edited.jsonl"
    edited.write_text(formats["jsonl"].read_text().replace('"answer": "4"', '"answer": "5"'))
    with pytest.raises(ConfigError, match="checkpoint's fingerprint"):
        PromptBatcher(load_dataset(str(edited)), 4, shuffle=True, seed=3).load_state_dict(state)


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "x.txt", "dataset file '.*x.txt': unknown format '.txt'"),
    (lambda d: d / "nope.parquet", "dataset file '.*nope.parquet' not found"),
    (lambda d: d, "dataset folder '.*' was not written by save_to_disk"),
])
def test_bad_sources(tmp_path, make, needle):
    p = make(tmp_path)
    if p.suffix == ".txt":
        p.write_text("hello")
    with pytest.raises(DatasetError, match=needle):
        load_dataset(str(p))


def test_corrupt_parquet_and_csv_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file at all")
    with pytest.raises(DatasetError) as e:
        load_dataset(str(junk))
    assert "junk.parquet" in str(e.value) and "datasets cannot read it as parquet" in str(e.value)
    assert "\n" not in str(e.value)
    no_prompt = tmp_path / "q.csv"
    no_prompt.write_text("question,answer\na,1\n")
    with pytest.raises(DatasetError, match="q.csv' has no \"prompt\" column \\(columns: question, answer\\)"):
        load_dataset(str(no_prompt))


def test_mixed_formats_are_refused(tmp_path):
    p = tmp_path / "mix.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(DatasetError, match="mix.jsonl:2: \"prompt\" is conversational but row 0's is standard; "
                                           "one dataset holds one format"):
        load_dataset(str(p))
    with pytest.raises(DatasetError, match="the list of rows cannot become a datasets.Dataset: ArrowTypeError"):
        load_dataset([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}])


@pytest.mark.parametrize("rows, needle", [
    ([{"prompt": [{"role": "user"}]}], "message 0 has no string 'content'"),
    ([{"prompt": []}], "it is an empty list of messages"),
])
def test_bad_prompts_name_the_row(rows, needle):
    with pytest.raises(DatasetError, match=needle):
        load_dataset(rows)


def test_conversational_jsonl_error_names_the_line(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(CHAT_ROWS[0]) + "\n\n" + json.dumps({"prompt": [{"role": "user", "content": None}],
                                                                  "solution": "1"}) + "\n")
    with pytest.raises(DatasetError, match=r"chat.jsonl:3: \"prompt\" .* message 0 has no string 'content'"):
        load_dataset(str(p))


# ------------------------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_tok")
    make_chat_tokenizer(path)
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def test_conversational_dataset_renders_with_the_chat_template(chat_tokenizer, tmp_path):
    p = tmp_path / "chat.json"
    p.write_text(json.dumps(CHAT_ROWS))
    ds = load_dataset(str(p))
    assert ds.format == "conversational" and ds.column_names == ["solution"]
    assert ds[1].prompt == CHAT_ROWS[1]["prompt"]
    check_tokenizer(ds.format, chat_tokenizer, "chat")  # has a template: no error
    ids = encode_prompt(chat_tokenizer, ds[1].prompt)
    assert chat_tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n")
    no_think = encode_prompt(chat_tokenizer, ds[1].prompt, {"enable_thinking": False})
    assert chat_tokenizer.decode(no_think, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids == chat_tokenizer.hf.apply_chat_template(CHAT_ROWS[1]["prompt"], add_generation_prompt=True,
                                                        tokenize=True, return_dict=True)["input_ids"]
    # a standard prompt is encoded as it is
    assert encode_prompt(chat_tokenizer, "1 + 1?") == chat_tokenizer.hf.encode("1 + 1?")
    assert completions_in_format(["4"], ds.format) == [[{"role": "assistant", "content": "4"}]]
    assert completions_in_format(["4"], "standard") == ["4"]


def test_toy_tokenizer_refuses_conversational_prompts(tmp_path):
    from compilepass.standby.grpo.trainer import GRPOTrainer

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"], base=default_config("tiny"))
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(cfg, progress=False, train_dataset=datasets.Dataset.from_list(CHAT_ROWS),
                    reward_funcs=["format_answer_tag"])
    assert str(e.value) == ("the dataset's prompts are conversational (lists of {role, content} messages) but the toy "
                            "tokenizer of preset 'tiny' has no chat template to render them; use a model whose "
                            "tokenizer has one, or string prompts")
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_chat_template_kwargs_config_key():
    c = load_config(None, ["data.chat_template_kwargs={enable_thinking: false}", "data.split=test"])
    assert c.data.chat_template_kwargs == {"enable_thinking": False} and c.data.split == "test"
    assert c.to_dict()["data"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert load_config(None, []).data.chat_template_kwargs == {}
    with pytest.raises(ConfigError, match="'data.chat_template_kwargs' must be a mapping of names to values"):
        load_config(None, ["data.chat_template_kwargs=[1, 2]"])


def test_a_template_that_cannot_render_is_one_line(tmp_path):
    from compilepass.standby.grpo.trainer import GRPOTrainer

    model = make_chat_model_dir(tmp_path / "model")
    (model / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    cfg = load_config(None, [f"model.name_or_path={model}", f"run.output_dir={tmp_path / 'run'}", "run.device=cpu",
                             "model.gradient_checkpointing=false"])
    with pytest.raises(ConfigError, match="the chat template cannot render the prompt '1 \\+ 1\\?': .*roles must alternate"):
        GRPOTrainer(cfg, progress=False, train_dataset=CHAT_ROWS[1:], reward_funcs=["format_answer_tag"])


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n',
     "{path}:2: invalid JSON: Expecting ',' delimiter (column 28)"),
    ("junk.parquet", "not parquet at all", "dataset file '{path}': datasets cannot read it as parquet: ArrowInvalid: "
                                          "Parquet magic bytes not found in footer."),
])
def test_cli_bad_dataset_file_is_one_line(tmp_path, name, content, message):
    """`compilepass grpo` on a broken file: exit 2 and one line naming it, nothing from datasets
    (its reader logs the parquet failure itself unless silenced) and no traceback."""
    bad = tmp_path / name
    bad.write_text(content)
    r = subprocess.run([sys.executable, "-m", "compilepass.cli", "grpo", "--preset", "tiny", "--no-progress",
                        f"data.dataset={bad}", "reward.functions=[exact_match]", "run.max_steps=1",
                        f"run.output_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                            "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "compilepass" in ln or "datasets" in ln or name in ln]
    assert len(lines) == 1 and lines[0].startswith("compilepass: error: " + message.format(path=bad)), r.stderr
    for noise in ("Traceback", "Generating train split", "Failed to", "examples/s"):
        assert noise not in r.stderr + r.stdout, noise
