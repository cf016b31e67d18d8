"""data.py: parsers on edge cases, prompt rendering, loading local files, and the error messages."""
import json
import os

import pytest

import data
from conftest import build_tokenizer


# ---------------------------------------------------------------- GSM8K parsing

@pytest.mark.parametrize("text, want", [
    ("so 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is -12.", "-12"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is $1,000.", "1000"),
    ("The answer is 1,234,567", "1234567"),
    ("First 5 then 6. The answer is 9. Wait, the answer is 10 apples, not 11.", "10"),  # last template, first number
    ("the answer is 42", "42"),                        # any case
    ("It costs 3 dollars and then 4 dollars", "4"),    # no template: last number
    ("The answer is unclear, maybe 8 or 9", "8"),     # first number after the template
    ("The answer is forty. Earlier I said 7.", "7"),   # number after the template wins even far away
    ("no numbers here at all", None),
    ("", None),
    ("The answer is .5", ".5"),
])
def test_extract_gsm8k_official(text, want):
    assert data.extract_gsm8k(text) == want


@pytest.mark.parametrize("text, strict, flexible", [
    ("The answer is 18.", "18", "18"),
    ("The answer is $1,000.", None, "1000"),       # strict admits no '$'
    ("The answer is -3.", "-3", "-3"),
    ("so we get 5 and then 12", None, "12"),
    ("the answer is 18.", None, "18"),             # strict is case-sensitive, like lm-eval
    ("nothing", None, None),
])
def test_lm_eval_variants(text, strict, flexible):
    assert data.extract_gsm8k_strict(text) == strict
    assert data.extract_gsm8k_flexible(text) == flexible


@pytest.mark.parametrize("pred, gold, equal", [
    ("18", "18", True), ("18.0", "18", True), ("$18", "18", True), ("1,000", "1000", True),
    ("18.", "18", True), ("-5", "5", False), ("17.999", "18", False), (None, "18", False), ("abc", "18", False),
    ("0.5", ".5", True),
])
def test_gsm8k_equal(pred, gold, equal):
    assert data.gsm8k_equal(pred, gold) is equal


# ---------------------------------------------------------------- ARC parsing

OPTS = ["5", "15", "meters", "kilometers"]


@pytest.mark.parametrize("text, options, want", [
    ("Blah. The answer is (B).", ["a", "b", "c", "d"], 1),
    ("The answer is B", ["x", "y", "z", "w"], 1),
    ("The answer is (C) kilometers", OPTS, 2),             # the letter decides
    ("The answer is 15.", OPTS, 1),                          # "5" must not match inside "15"
    ("The answer is 5.", OPTS, 0),
    ("The answer is kilometers.", OPTS, 3),                  # exact text beats containment of "meters"
    ("The answer is measured in kilometers, clearly.", OPTS, 3),  # "meters" is not a whole token here
    ("The answer is it is red and blue", ["red", "red and blue", "green"], 1),  # the longer covers the other
    ("The answer is 5 or 15", OPTS, None),                   # ambiguous: neither covers the other
    ("The answer is 1.5 m", ["1.5 m", "11.5 m", "1.55 m", "2 m"], 0),
    ("The answer is 11.5 m", ["1.5 m", "11.5 m", "1.55 m", "2 m"], 1),
    ("The answer is 'Planetary days will become shorter.'", ["Planetary density will decrease.",
                                                            "Planetary days will become shorter."], 1),
    ("I think it is Mars.", ["Mars", "Venus"], None),        # no template: no answer
    ("The answer is A cell wall", ["A cell wall", "A nucleus"], 0),  # "A" starting an option is not a letter
    ("The answer is (E)", ["a", "b", "c", "d"], None),       # letter beyond the options
    ("The answer is Rr.", ["R", "rr", "Rr", "RR"], 2),       # options that differ only by case
])
def test_extract_arc(text, options, want):
    assert data.extract_arc(text, options) == want


def test_arc_official_containment_is_ambiguous():
    # the official rule accepts "15" when the gold is "5": that is why eval.py reports the exact rule too
    assert data.arc_official_correct("The answer is 15", "5")
    assert data.extract_arc("The answer is 15", OPTS) != 0
    assert not data.arc_official_correct("no template 5", "5")


# ---------------------------------------------------------------- prompts

def test_prompt_with_chat_template():
    tok = build_tokenizer(chat_template=True)
    ex = data.Example("gsm8k", "t-0", "How many eggs?", "18")
    assert data.render_prompt(tok, ex) == ("<|im_start|>user\nHow many eggs? Let's think step by step.<|im_end|>\n"
                                           "<|im_start|>assistant\n")
    assert data.answer_text(ex) == "The answer is 18."
    assert data.end_of_turn(tok) == "<|im_end|>"


def test_prompt_plain_fallback():
    tok = build_tokenizer(chat_template=False)
    ex = data.Example("gsm8k", "t-0", "How many eggs?", "18")
    assert data.render_prompt(tok, ex) == "How many eggs?\nLet's think step by step.\n"
    arc = data.Example("arc_challenge", "x", "Which?", "Mars", ["Mars", "Sun"], ["A", "B"], 0)
    assert data.render_prompt(tok, arc) == ("Question: Which?\nOptions: ['Mars', 'Sun']\nLet's think step by step "
                                            "first then print your answer like 'The answer is (one of the options)'.\n")


def test_arc_prompt_matches_paper():
    arc = data.Example("arc_challenge", "x", "Which?", "Mars", ["Mars", "Sun"], ["A", "B"], 0)
    assert data.user_message(arc).startswith("Question: Which?\nOptions: ['Mars', 'Sun']\n")
    assert data.user_message(arc).endswith("'The answer is (one of the options)'.")


# ---------------------------------------------------------------- loading

def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_load_local_gsm8k_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "Q1 ?", "answer": "work\n#### 1,200"},
                                           {"question": "Q2", "answer": "#### -3"}])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "Q3", "answer": "#### 7"}])
    train = data.load_split(str(tmp_path), "train")
    assert [(e.task, e.gold, e.question) for e in train] == [("gsm8k", "1200", "Q1 ?"), ("gsm8k", "-3", "Q2")]
    assert data.load_split(str(tmp_path), "test")[0].gold == "7"


def test_load_local_arc_file_with_numeric_labels(tmp_path):
    row = {"id": "q1", "question": "Which?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    ex = data.load_split(write_jsonl(tmp_path / "x.jsonl", [row]), "train")[0]
    assert (ex.task, ex.gold, ex.gold_index, ex.labels) == ("arc_challenge", "b", 1, ["A", "B", "C"])


def test_load_parquet(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"question": "Q", "answer": "#### 4"}]).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    assert data.load_split(str(tmp_path), "train")[0].gold == "4"


def test_error_missing_path():
    with pytest.raises(data.DataError, match="no/such/folder.*neither an existing file/folder nor a known name"):
        data.load_split("no/such/folder", "train")


def test_error_gsm8k_row_without_hashes(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Q", "answer": "#### 1"},
                                                  {"question": "Q", "answer": "no final answer"}])
    with pytest.raises(data.DataError, match=r"train.jsonl row 1 \(line 2\): GSM8K answer has no '####'"):
        data.load_split(path, "train")


def test_error_arc_bad_answer_key(tmp_path):
    row = {"id": "Mercury_1", "question": "Q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}
    with pytest.raises(data.DataError, match=r"row 0 \(id Mercury_1\): answerKey 'E' not among labels"):
        data.load_split(write_jsonl(tmp_path / "a.jsonl", [row]), "train")


def test_error_folder_without_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "Q", "answer": "#### 1"}])
    with pytest.raises(data.DataError, match="no validation file"):
        data.load_split(str(tmp_path), "validation")


def test_error_unknown_fields(tmp_path):
    with pytest.raises(data.DataError, match="cannot tell GSM8K"):
        data.load_split(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]), "train")


def test_error_unreadable_json(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "Q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_split(str(tmp_path), "train")


def test_split_validation_is_fixed_and_disjoint():
    exs = [data.Example("gsm8k", str(i), f"q{i}", str(i)) for i in range(50)]
    tr, va = data.split_validation(exs, 10, seed=3)
    tr2, va2 = data.split_validation(exs, 10, seed=3)
    assert [e.id for e in va] == [e.id for e in va2] and len(va) == 10 and len(tr) == 40
    assert not {e.id for e in tr} & {e.id for e in va}
    with pytest.raises(data.DataError, match="--val-size 50"):
        data.split_validation(exs, 50)


def test_shared_files_parse(shared_data):
    gsm = data.load_split(os.path.join(shared_data, "gsm8k"), "test")
    arc = data.load_split(os.path.join(shared_data, "arc_challenge"), "test")
    assert len(gsm) == 1319 and gsm[0].gold == "18"
    assert len(arc) == 1172 and all(0 <= e.gold_index < len(e.options) for e in arc)
    # every gold answer parses back with both the official and the exact rule
    assert all(data.gsm8k_equal(data.extract_gsm8k(f"The answer is {e.gold}."), e.gold) for e in gsm)
    assert all(data.extract_arc(f"The answer is {e.gold}.", e.options) == e.gold_index for e in arc)


def test_error_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataError, match="cannot load openai/gsm8k .* pass a local file or folder"):
        data.load_split("gsm8k", "test")
