"""
data.py: GSM8K and ARC-Challenge for LaTRO training and evaluation.

What it does: loads either dataset from the Hugging Face hub (`openai/gsm8k` config `main`,
`allenai/ai2_arc` config `ARC-Challenge`) or from local JSONL / JSON / parquet files with the hub's field
names, through the same `datasets.load_dataset` call; turns every row into an `Example`; renders the
zero-shot prompt x exactly as the paper does (through the tokenizer's chat template when it has one); builds
the gold answer y = "The answer is {gold}." + end-of-turn token; and parses model outputs.

Prompts (LaTRO paper, Chen et al. 2024, arXiv 2411.04282, Sec. 5 and the official code):
    GSM8K user message: "{question} Let's think step by step."
    ARC   user message: "Question: {question}\nOptions: {options}\nLet's think step by step first then print
                         your answer like 'The answer is (one of the options)'."
    Without a chat template the prompt is the message with " Let's" -> "\nLet's", followed by a newline.

Answer parsing (all importable; eval.py reports every rule):
    extract_gsm8k           official rule: FIRST number after the LAST "The answer is", else the last number.
    extract_gsm8k_strict    lm-evaluation-harness strict-match: "The answer is (-?[0-9.,]+)."
    extract_gsm8k_flexible  lm-evaluation-harness flexible-extract: the last number-like token.
    gsm8k_equal             numeric comparison ("18" == "18.0" == "$18"; "1,000" == "1000").
    extract_arc             index of the chosen option (exact rule, see its docstring).
    arc_official_correct    the official containment rule (gold option text inside the answer text).

Departures from the official code:
1. Checkpoints are chosen on a validation slice of train (`split_validation`), not on the test set.
2. ARC answers are scored with an exact rule besides the official containment rule, because 20 of the 1172
   test questions have an option that is a substring of another ("5" / "15", "meters" / "kilometers").
"""
import os
import random
import re
from dataclasses import dataclass, field

# Known datasets: short name -> (hub id, hub config). Hub ids are accepted as aliases.
DATASETS = {
    "gsm8k": ("openai/gsm8k", "main"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
}
HUB_ALIASES = {hub: name for name, (hub, _) in DATASETS.items()}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# y is written with this template; the variants that END a rationale are matched by latro.TEMPLATE.
ANSWER_PREFIX = "The answer is"
GSM8K_SUFFIX = " Let's think step by step."
ARC_SUFFIX = "\nLet's think step by step first then print your answer like 'The answer is (one of the options)'."


class DataError(ValueError):
    """Bad dataset input; the message names the file/row or the name that is wrong."""


@dataclass
class Example:
    """One question. `gold` is the bare gold value: a number string (GSM8K) or the option text (ARC)."""
    task: str                       # "gsm8k" or "arc_challenge"
    id: str                         # hub id (ARC) or "<split>-<row>" (GSM8K)
    question: str
    gold: str
    options: list = field(default_factory=list)   # ARC option texts, in label order
    labels: list = field(default_factory=list)    # ARC option labels ("A".."E")
    gold_index: int = -1                          # ARC index of the gold option


# ----------------------------------------------------------------------------------------------------------
# Loading

def _local_files(path: str, split: str) -> list:
    """The data files of `split` under a local file or folder (None if `path` does not exist)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    # "<split>.jsonl", "<split>-00000-of-00001.parquet", "<split>_x.json": the hub's own naming schemes
    files = [os.path.join(path, n) for n in names if n.endswith(LOCAL_SUFFIXES) and re.match(rf"{re.escape(split)}([.\-_]|$)", n)]
    if not files:
        raise DataError(f"no {split} file ({'/'.join(LOCAL_SUFFIXES)}) in folder {path!r}; it has: {names}")
    return files


def _raw_rows(name_or_path: str, split: str):
    """(rows, source description). Local files and the hub go through the same `datasets.load_dataset`."""
    import datasets  # imported here so that `import data` stays fast for the parsers
    files = _local_files(name_or_path, split)
    if files is not None:
        fmt = "parquet" if files[0].endswith(".parquet") else "json"
        try:
            ds = datasets.load_dataset(fmt, data_files={split: files}, split=split)
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as e:
            raise DataError(f"cannot read {files}: {type(e).__name__}: {e}") from e
        return ds, files[0] if len(files) == 1 else f"{name_or_path} ({len(files)} files)"
    key = HUB_ALIASES.get(name_or_path, name_or_path)
    if key not in DATASETS:
        raise DataError(f"dataset {name_or_path!r} is neither an existing file/folder nor a known name "
                        f"({', '.join(list(DATASETS) + list(HUB_ALIASES))})")
    hub, config = DATASETS[key]
    try:
        return datasets.load_dataset(hub, config, split=split), f"{hub}:{config}:{split}"
    except (ConnectionError, OSError, ValueError) as e:  # offline, no such split, hub down
        raise DataError(f"cannot load {hub} ({config}, split {split}) from the Hugging Face hub: {e}; "
                        f"pass a local file or folder instead") from e


def infer_task(name_or_path: str, first_row: dict) -> str:
    """The task of a dataset: from its name when known, else from its fields."""
    key = HUB_ALIASES.get(name_or_path, name_or_path)
    if key in DATASETS:
        return key
    if "choices" in first_row and "answerKey" in first_row:
        return "arc_challenge"
    if "question" in first_row and "answer" in first_row:
        return "gsm8k"
    raise DataError(f"{name_or_path!r}: cannot tell GSM8K (question, answer) from ARC (question, choices, "
                    f"answerKey) by its fields {sorted(first_row)}")


def _gsm8k_example(row: dict, i: int, split: str, source: str) -> Example:
    if "####" not in row.get("answer", ""):
        raise DataError(f"{source} row {i} (line {i + 1}): GSM8K answer has no '####': {row.get('answer')!r:.80}")
    # the gold is what follows the last "####"; commas go ("1,000" -> "1000") so that y reads as a number
    gold = row["answer"].split("####")[-1].strip().replace(",", "")
    return Example("gsm8k", f"{split}-{i}", row["question"].strip(), gold)


def _arc_example(row: dict, i: int, source: str) -> Example:
    texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
    # 23 NYSED questions use labels 1-4 on the hub; map them to letters so "(B)" parsing works everywhere
    labels = ["ABCDE"[int(l) - 1] if l.isdigit() else l for l in labels]
    key = "ABCDE"[int(row["answerKey"]) - 1] if row["answerKey"].isdigit() else row["answerKey"]
    if key not in labels:
        raise DataError(f"{source} row {i} (id {row.get('id')}): answerKey {row['answerKey']!r} not among "
                        f"labels {labels}")
    j = labels.index(key)
    # y is built from the option TEXT (the paper's "The answer is {text of the correct option}.")
    return Example("arc_challenge", str(row.get("id", i)), row["question"].strip(), texts[j].strip(),
                   [t.strip() for t in texts], labels, j)


def load_split(name_or_path: str, split: str = "train") -> list:
    """All rows of one split as `Example`s. `name_or_path`: gsm8k | arc_challenge | a hub id | a local path."""
    rows, source = _raw_rows(name_or_path, split)
    # every row is checked here, at load time, so that a bad row fails before any GPU time is spent
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    task = infer_task(name_or_path, rows[0])
    if task == "gsm8k":
        return [_gsm8k_example(r, i, split, source) for i, r in enumerate(rows)]
    return [_arc_example(r, i, source) for i, r in enumerate(rows)]


def split_validation(examples: list, n_val: int, seed: int = 0):
    """(train, val): a fixed random `n_val` rows of train held out for checkpoint selection."""
    if not 0 <= n_val < len(examples):
        raise DataError(f"--val-size {n_val} must be in [0, {len(examples)}) for a split of {len(examples)} rows")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # a private Random: the global RNG state is left alone
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


# ----------------------------------------------------------------------------------------------------------
# Prompts and gold answers

def user_message(ex: Example) -> str:
    if ex.task == "gsm8k":
        return ex.question + GSM8K_SUFFIX
    # the options as a Python list of their texts, as the official prompt formats them
    return f"Question: {ex.question}\nOptions: {ex.options}" + ARC_SUFFIX


def render_prompt(tokenizer, ex: Example) -> str:
    """The prompt x as text: chat template + generation prompt, or the plain fallback."""
    msg = user_message(ex)
    # instruct models are scored as they are used: one user turn, then the assistant header to continue
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                             add_generation_prompt=True)
    return msg.replace(" Let's think", "\nLet's think") + "\n"


def end_of_turn(tokenizer) -> str:
    """The token that ends an assistant turn (<|im_end|>, <|eot_id|>, </s>): the tokenizer's eos."""
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to end the answer with")
    return tokenizer.eos_token


def answer_text(ex: Example) -> str:
    """y without the end-of-turn token: "The answer is {gold}." (a space before it comes from the caller)."""
    return f"{ANSWER_PREFIX} {ex.gold}."


# ----------------------------------------------------------------------------------------------------------
# GSM8K parsing

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


# NUMBER: an optional minus and "$", digits with thousands commas, an optional decimal part (or ".5")
def _clean_number(s: str) -> str:
    """lm-eval's ignore list for GSM8K: commas, '$', a trailing period."""
    return re.sub(r"\.$", "", s.replace(",", "").replace("$", ""))


def extract_gsm8k(text: str):
    """Official rule: the FIRST number after the LAST "The answer is" (any case), else the last number."""
    parts = re.split(r"the answer is", text, flags=re.IGNORECASE)
    if len(parts) > 1:  # parts[-1] is the text after the LAST template: a model that corrects itself wins
        after = NUMBER.findall(parts[-1])
        if after:
            return _clean_number(after[0])
    nums = NUMBER.findall(text)
    return _clean_number(nums[-1]) if nums else None


def extract_gsm8k_strict(text: str):
    """lm-eval strict-match: first "The answer is <number>." (case-sensitive), or None."""
    m = STRICT.search(text)
    return _clean_number(m.group(1)) if m else None


def extract_gsm8k_flexible(text: str):
    """lm-eval flexible-extract: the last match of (-?[$0-9.,]{2,})|(-?[0-9]+), or None."""
    found = [a or b for a, b in FLEXIBLE.findall(text)]  # findall gives (group1, group2): one is empty
    return _clean_number(found[-1]) if found else None


def gsm8k_equal(pred, gold) -> bool:
    """Numeric equality of two answer strings; False when either does not parse as a number."""
    def num(s):
        if s is None:
            return None
        try:
            return float(str(s).replace(",", "").replace("$", "").rstrip("."))
        except ValueError:
            return None
    a, b = num(pred), num(gold)
    # relative tolerance: float("0.1") + float("0.2") style noise never decides a GSM8K answer
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


# ----------------------------------------------------------------------------------------------------------
# ARC parsing

def answer_segment(text: str):
    """The text after the LAST "the answer is" up to the end of that line, or None."""
    parts = re.split(r"the answer is", text, flags=re.IGNORECASE)
    return parts[-1].strip().split("\n")[0] if len(parts) > 1 else None


def _norm(s: str, lower: bool = True) -> str:
    s = re.sub(r"\s+", " ", s.strip().strip(" .:'\"`*()"))
    return s.lower() if lower else s


def _contains(hay: str, needle: str) -> bool:
    """`needle` in `hay` as a whole token: "5" is not in "15", "1.5" is not in "11.5" or "1.55"."""
    return re.search(rf"(?<![\w.]){re.escape(needle)}(?![\w]|\.\d)", hay) is not None


def extract_arc(text: str, options: list):
    """Index of the option chosen after the LAST "the answer is", or None. The rule, in order:
    1. a letter label alone or bracketed, "B", "(B)", "B)", or "(B) <anything>": that letter's option;
    2. the segment equals an option text (spaces, quotes, brackets and a final period ignored), with its case,
       then ignoring case;
    3. otherwise the options contained in the segment as whole tokens ("5" does not match "15"); if several
       match, the longest wins when it contains all the others as whole tokens ("red and blue" over "red";
       "meters" never matches inside "kilometers"), else None (ambiguous: "5 or 15")."""
    seg = answer_segment(text)
    if seg is None:
        return None
    letters = "ABCDE"[:len(options)]
    # a bare letter must be short ("B", "B.") or bracketed: "A cell wall" is an option text, not letter A
    m = re.match(rf"^\(?([{letters}])\)?(?:[.:,)]|\s|$)", seg.strip())
    if m and (len(seg.strip()) <= 3 or seg.strip().startswith("(") or seg.strip()[1:2] == ")"):
        return letters.index(m.group(1))
    for lower in (False, True):  # case matters first: some options differ only by case ("rr" / "Rr")
        nseg, nopts = _norm(seg, lower), [_norm(o, lower) for o in options]
        if nseg in nopts:
            return nopts.index(nseg)
    hits = [i for i, o in enumerate(nopts) if o and _contains(nseg, o)]   # nseg/nopts: the case-blind pass
    if len(hits) == 1:
        return hits[0]
    if hits:
        longest = max(hits, key=lambda i: len(nopts[i]))
        if all(_contains(nopts[longest], nopts[i]) for i in hits):
            return longest
    return None


def is_correct(ex: Example, text: str) -> bool:
    """The rule used for checkpoint selection: official numeric rule (GSM8K), exact option rule (ARC)."""
    if ex.task == "gsm8k":
        return gsm8k_equal(extract_gsm8k(text), ex.gold)
    return extract_arc(text, ex.options) == ex.gold_index


def arc_official_correct(text: str, gold_text: str) -> bool:
    """Official rule: the gold option text is contained in the text after "the answer is" (any case)."""
    seg = answer_segment(text)
    return seg is not None and gold_text.strip().lower() in seg.lower()
