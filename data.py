"""
data.py: GSM8K, ARC-Challenge and a generated arithmetic task for LaTRO training and evaluation.

What it does: loads either dataset from the Hugging Face hub (`openai/gsm8k` config `main`,
`allenai/ai2_arc` config `ARC-Challenge`) or from local JSONL / JSON / parquet files with the hub's field
names, or generates `arith[:SEED]` (short arithmetic word problems in GSM8K's format, splits that never share a
problem); checks every row at load time (a bad row is a one-line `DataError` naming the file, the line and the
field); turns every row into an `Example`; renders the zero-shot prompt x exactly as the official code does
and turns it into token ids in ONE place (`prompt_ids`, used by training, validation and eval.py); builds the
gold answer y = "The answer is {gold}." + the end-of-turn token; and parses model outputs.
How to read it: loading (files, the hub, the generator, one check per row), then prompts and y, then the
GSM8K parse rules, then the ARC rules; each rule is a function of the output text alone.

Prompts (LaTRO paper, Chen et al. 2024, arXiv 2411.04282, Sec. 5, as the official code writes them):
    GSM8K  chat template: user "{question} Let's think step by step."
           no template:   "{question}\nLet's think step by step."
    ARC    chat template: user "Question: {question}\nOptions: {option texts as a Python list}\nLet's think step
                          by step first then print your answer like 'The answer is (one of the options)'."
           no template:   "Question: {question}\nOptions: {option list}\nAnswer: Let's think step by step."
    BOS: a chat template's text holds the BOS; without one, the prompt starts with the tokenizer's BOS exactly
    when the tokenizer adds one (Llama-3 base models need <|begin_of_text|>).
    End of turn: the token the chat template writes after an assistant message (<|im_end|>, <|eot_id|>,
    Phi-3.5's <|end|>), else the tokenizer's eos.

Answer parsing (all importable; eval.py reports every rule):
    extract_gsm8k / gsm8k_official_equal  the official rule, exactly: FIRST number after the LAST "The answer is"
                                           (case-sensitive), else the last number; float equality
    extract_gsm8k_strict                   lm-evaluation-harness strict-match "The answer is (-?[0-9.,]+)."
    extract_gsm8k_flexible                 lm-evaluation-harness flexible-extract: the last number-like token
    arc_official_answer / arc_official_correct  the official rule, exactly: the gold text is contained in the
                                           first sentence holding "the answer is" (after it), else the last sentence
    extract_arc                            this project's exact rule: the ONE option chosen (letter, exact text,
                                           or unambiguous whole-token containment)

Departures from the official code:
1. Checkpoints are chosen on a validation slice of train (`split_validation`), not on the test set.
2. ARC answers are scored with an exact rule besides the official containment rule, because 20 of the 1172
   test questions have an option that is a substring of another ("5" / "15", "meters" / "kilometers").
3. The GSM8K gold loses its thousands commas ("1,000" -> "1000"), so y reads "The answer is 1000."; the
   official code keeps them. Both parse to the same number.
"""
import json
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

# y is written with this prefix; the variants that END a rationale are matched by latro.TEMPLATE.
ANSWER_PREFIX = "The answer is"
COT = "Let's think step by step."
ARC_INSTRUCTION = "Let's think step by step first then print your answer like 'The answer is (one of the options)'."
NUMBER = re.compile(r"-?[\d,]*\.?\d+")   # the official number finder (GSM8K gold and answers)

class DataError(ValueError):
    """Bad dataset input; the message names the file, the line or row, and the field."""

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
    where: str = ""                               # file and line (or hub row), for messages

# ----------------------------------------------------------------------------------------------------------
# Loading: rows with where they came from, then one check per row

def _local_files(path: str, split: str):
    """The data files of `split` under a local file or folder (None if `path` does not exist)."""
    if os.path.isfile(path):
        if not path.endswith(LOCAL_SUFFIXES):
            raise DataError(f"{path}: unsupported format {os.path.splitext(path)[1] or '(no suffix)'!r}; "
                            f"use {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    # "<split>.jsonl", "<split>-00000-of-00001.parquet", "<split>_x.json": the hub's own naming schemes
    files = [os.path.join(path, n) for n in names if n.endswith(LOCAL_SUFFIXES) and re.match(rf"{re.escape(split)}([.\-_]|$)", n)]
    if not files:
        raise DataError(f"no {split} file ({'/'.join(LOCAL_SUFFIXES)}) in folder {path!r}; it has: {names}")
    return files

def _read_json_lines(path: str, text: str):
    """(where, row) per non-blank line; a line that is not a JSON object names its line number."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        yield f"{path} line {n}", row

def _read_file(path: str):
    """(where, row) pairs of one local file: JSON lines, a JSON array, or parquet."""
    if path.endswith(".parquet"):
        import datasets  # imported here so that `import data` stays fast for the parsers
        try:
            rows = datasets.Dataset.from_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file; all mean "cannot read"
            raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {str(e)[:200]})") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(rows)]
    try:
        with open(path, encoding="utf-8-sig") as f:   # a byte-order mark (Windows editors) is dropped
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if text.lstrip().startswith("["):  # a JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path} item {bad}: expected a JSON object")
        return [(f"{path} item {i}", r) for i, r in enumerate(rows)]
    return list(_read_json_lines(path, text))

def _raw_rows(name_or_path: str, split: str) -> list:
    """[(where, row dict)]: local files read here (so errors name the line), hub datasets via `datasets`."""
    m = re.fullmatch(r"arith(?::(\d+))?", name_or_path)
    if m:   # the generated task: "arith" (generator seed 0) or "arith:SEED"
        return arith_rows(int(m.group(1) or 0), split)
    files = _local_files(name_or_path, split)
    if files is not None:
        rows = [r for path in files for r in _read_file(path)]
        if not rows:
            raise DataError(f"{', '.join(files)}: no rows (empty file)")
        return rows
    key = HUB_ALIASES.get(name_or_path, name_or_path)
    if key not in DATASETS:
        raise DataError(f"dataset {name_or_path!r} is neither an existing file/folder nor a known name "
                        f"({', '.join(list(DATASETS) + list(HUB_ALIASES))}, arith[:SEED] with SEED >= 0)")
    import datasets
    hub, config = DATASETS[key]
    try:
        ds = datasets.load_dataset(hub, config, split=split)
    except (ConnectionError, OSError, ValueError) as e:  # offline, no such split, hub down
        raise DataError(f"cannot load {hub} ({config}, split {split}) from the Hugging Face hub: {e}; "
                        f"pass a local file or folder instead") from e
    return [(f"{hub}:{config}:{split} row {i}", r) for i, r in enumerate(ds)]

# ----------------------------------------------------------------------------------------------------------
# A generated task: arithmetic word problems in GSM8K's format, easy enough that a 135M model can improve

ARITH_SIZES = {"train": 4000, "validation": 500, "test": 1000}
ARITH_NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Jack", "Emma", "Leo", "Zoe"]
ARITH_ITEMS = ["apple", "book", "coin", "stamp", "marble", "cookie", "pencil", "card"]
ARITH_ONE_STEP = 0.7   # the share of 1-step problems: SmolLM2-135M gets ~17% of these and ~3% of 2-step ones

def _arith_expressions(steps: int) -> list:
    """Every problem of `steps` steps: a start in 2..9, then "+ y" (y in 1..9) or "- y" (leaving at least 1)."""
    done, value = [[(x,)] for x in range(2, 10)], lambda e: e[0][0] + sum(y if o == "+" else -y for o, y in e[1:])
    for _ in range(steps):
        done = [e + [op] for e in done for op in [("+", y) for y in range(1, 10)] + [("-", y) for y in range(1, value(e))]]
    return done

def arith_rows(seed: int, split: str) -> list:
    """ARITH_SIZES[split] GSM8K-shaped rows {question, answer} of 1 or 2 steps, from generator seed `seed`. The
    splits never share a problem: every expression (start, operations, numbers) belongs to ONE split, drawn with
    the seed (70% train, 10% validation, 20% test of each step count); only the names and items vary within a
    split, and no question text repeats."""
    if split not in ARITH_SIZES:
        raise DataError(f"the arith generator has no split {split!r} (it has {', '.join(ARITH_SIZES)})")
    pools = {}
    for steps in (1, 2):
        exprs = _arith_expressions(steps)
        random.Random(f"arith-{seed}-{steps}").shuffle(exprs)
        n_test, n_val = round(0.2 * len(exprs)), round(0.1 * len(exprs))
        pools[steps] = {"test": exprs[:n_test], "validation": exprs[n_test:n_test + n_val],
                        "train": exprs[n_test + n_val:]}[split]
    rng, rows, seen = random.Random(f"arith-{seed}-{split}"), [], set()
    while len(rows) < ARITH_SIZES[split]:
        steps = 1 if rng.random() < ARITH_ONE_STEP else 2
        expr, name, item = rng.choice(pools[steps]), rng.choice(ARITH_NAMES), rng.choice(ARITH_ITEMS)
        things = lambda n: f"{n} {item}" + "s" * (n != 1)
        text, work, x = [f"{name} has {things(expr[0][0])}."], [], expr[0][0]
        for op, y in expr[1:]:
            text.append(f"{name} gets {y} more {item}{'s' * (y != 1)}." if op == "+" else f"{name} gives away {things(y)}.")
            work.append(f"{x} {op} {y} = {x + y if op == '+' else x - y}")
            x = x + y if op == "+" else x - y
        question = " ".join(text) + f" How many {item}s does {name} have now?"
        if question not in seen:
            seen.add(question)
            rows.append((f"arith:{seed} {split} row {len(rows)}", {"question": question,
                                                                    "answer": "\n".join(work) + f"\n#### {x}"}))
    return rows

def infer_task(name_or_path: str, where: str, first_row: dict) -> str:
    """The task of a dataset: from its name when known, else from the fields of its first row."""
    key = HUB_ALIASES.get(name_or_path, name_or_path)
    if key in DATASETS:
        return key
    if "choices" in first_row or "answerKey" in first_row:
        return "arc_challenge"
    if "answer" in first_row:
        return "gsm8k"
    raise DataError(f"{where}: cannot tell GSM8K (question, answer) from ARC (question, choices, answerKey) by "
                    f"its fields {sorted(first_row)}")

def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
    return value

def _gsm8k_example(row: dict, where: str, ident: str) -> Example:
    question, answer = _text_field(row, "question", where), _text_field(row, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: field 'answer' has no '#### <number>' at its end: {answer[-60:]!r}")
    # the gold is what follows the last "####"; commas go ("1,000" -> "1000"; departure 3)
    gold = answer.split("####")[-1].strip()
    if not NUMBER.fullmatch(gold):
        raise DataError(f"{where}: field 'answer' ends in '#### {gold}', which is not a number")
    return Example("gsm8k", ident, question, gold.replace(",", ""), where=where)

def _arc_example(row: dict, where: str, ident: str) -> Example:
    question = _text_field(row, "question", where)
    choices = row.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list):
        raise DataError(f"{where}: field 'choices' must be {{'text': [...], 'label': [...]}}, got {choices!r:.80}")
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or len(texts) < 2:
        raise DataError(f"{where}: field 'choices' has {len(labels)} labels and {len(texts)} texts (need the same "
                        f"number, at least 2)")
    if not all(isinstance(x, str) and x.strip() for x in texts + labels):
        raise DataError(f"{where}: field 'choices' holds an empty or non-string text or label")
    # 23 NYSED questions use labels 1-4 on the hub; map them to letters so "(B)" parsing works everywhere
    letter = lambda l: "ABCDE"[int(l) - 1] if l.isdigit() and 1 <= int(l) <= 5 else l
    labels, key = [letter(l) for l in labels], letter(str(row.get("answerKey", "")))
    if len(set(labels)) != len(labels) or key not in labels:
        raise DataError(f"{where}: field 'answerKey' {row.get('answerKey')!r} is not one of the labels {labels}")
    j = labels.index(key)
    # y is built from the option TEXT (the paper's "The answer is {text of the correct option}.")
    return Example("arc_challenge", str(row.get("id", ident)), question, texts[j].strip(),
                   [t.strip() for t in texts], labels, j, where)

def load_split(name_or_path: str, split: str = "train") -> list:
    """All rows of one split as `Example`s. `name_or_path`: gsm8k | arc_challenge | a hub id | a local path.
    Every row is checked here, at load time, so that a bad row fails before any GPU time is spent."""
    rows = _raw_rows(name_or_path, split)
    task = infer_task(name_or_path, *rows[0])
    make = _gsm8k_example if task == "gsm8k" else _arc_example
    return [make(row, where, f"{split}-{i}") for i, (where, row) in enumerate(rows)]

def split_validation(examples: list, n_val: int, seed: int = 0):
    """(train, val): a fixed random `n_val` rows of train held out for checkpoint selection."""
    if not 0 <= n_val < len(examples):
        raise DataError(f"--val-size {n_val} must be smaller than the {len(examples)} train rows")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # a private Random: the global RNG state is left alone
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]

# ----------------------------------------------------------------------------------------------------------
# Prompts and gold answers

def user_message(ex: Example, chat: bool = True) -> str:
    """The question as the official code words it, with (`chat`) or without a chat template."""
    # the options as a Python list of their texts, as the official prompt formats them
    if ex.task == "gsm8k":
        return f"{ex.question} {COT}" if chat else f"{ex.question}\n{COT}"
    head = f"Question: {ex.question}\nOptions: {ex.options}\n"
    return head + ARC_INSTRUCTION if chat else head + f"Answer: {COT}"

def render_prompt(tokenizer, ex: Example) -> str:
    """The prompt x as text: one user turn + the assistant header of the chat template, or the plain form."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(ex)}], tokenize=False,
                                             add_generation_prompt=True)
    return user_message(ex, chat=False)

def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of what it encodes (Llama-3, Mistral: yes; GPT-2 style: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]

def prompt_ids(tokenizer, examples: list) -> list:
    """The ONE place examples become prompt token ids (training, validation, held-out rollouts, eval.py): one id
    list per example, encoded as a batch. A chat template's text holds the BOS (encoding must not add a second
    one); a template-less (base) model gets the tokenizer's BOS exactly when the tokenizer adds one itself."""
    texts = [render_prompt(tokenizer, ex) for ex in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if not getattr(tokenizer, "chat_template", None) and adds_bos(tokenizer):
        ids = [[tokenizer.bos_token_id] + i for i in ids]
    return ids

def end_of_turn(tokenizer) -> str:
    """The token that ends an assistant turn: the first token the chat template writes after an assistant
    message (<|im_end|>, <|eot_id|>, Phi-3.5's <|end|>, </s>); without a template, or when it writes none,
    the tokenizer's eos."""
    marker = "LATRO-END-OF-TURN-PROBE"
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that refuses this 2-turn chat (jinja raises its own types): use the eos
            text = ""
        after = text.split(marker, 1)[1] if marker in text else ""
        ids = tokenizer.encode(after, add_special_tokens=False)[:1]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if ids and ids[0] in special:
            return tokenizer.convert_ids_to_tokens(ids[0])
    if tokenizer.eos_token is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-turn or eos token to end y with")
    return tokenizer.eos_token

def answer_text(ex: Example) -> str:
    """y without the end-of-turn token: "The answer is {gold}." (a space before it comes from the caller)."""
    return f"{ANSWER_PREFIX} {ex.gold}."

# ----------------------------------------------------------------------------------------------------------
# GSM8K parsing

STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

def extract_gsm8k(text: str):
    """The official rule, exactly: if "The answer is" (case-sensitive) occurs, the FIRST number after its LAST
    occurrence; else (or if none follows) the LAST number of the text; commas removed. None: no number."""
    if ANSWER_PREFIX in text:
        after = NUMBER.findall(text.split(ANSWER_PREFIX)[-1])
        if after:
            return after[0].replace(",", "")
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None

def gsm8k_official_equal(pred, gold: str) -> bool:
    """The official comparison: the gold goes through the same number finder; float equality, falling back to
    string equality when either side is not a float."""
    gold = extract_gsm8k(gold) or ""
    try:
        return float(gold) == float(pred or "")
    except ValueError:
        return gold == (extract_gsm8k(pred or "") or "")

def _clean_number(s: str) -> str:
    """lm-eval's ignore list for GSM8K: commas, '$', a trailing period."""
    return re.sub(r"\.$", "", s.replace(",", "").replace("$", ""))

def extract_gsm8k_strict(text: str):
    """lm-eval strict-match: first "The answer is <number>." (case-sensitive), or None."""
    m = STRICT.search(text)
    return _clean_number(m.group(1)) if m else None

def extract_gsm8k_flexible(text: str):
    """lm-eval flexible-extract: the last match of (-?[$0-9.,]{2,})|(-?[0-9]+), or None."""
    found = [a or b for a, b in FLEXIBLE.findall(text)]  # findall gives (group1, group2): one is empty
    return _clean_number(found[-1]) if found else None

def gsm8k_equal(pred, gold) -> bool:
    """Numeric equality for the lm-eval rules ("18" == "18.0" == "$18"); False when either is not a number."""
    def num(s):
        try:
            return float(str(s).replace(",", "").replace("$", "").rstrip("."))
        except ValueError:
            return None
    a, b = (None, None) if pred is None else (num(pred), num(gold))
    return a is not None and b is not None and a == b

# ----------------------------------------------------------------------------------------------------------
# ARC parsing

ARC_DELIMITER = "the answer is"

def arc_official_answer(text: str):
    """The official rule's answer text, exactly: None for an empty output; if the lower-cased output holds
    "the answer is", the FIRST "."-separated piece of the output that holds it, lower-cased, after the
    delimiter's last occurrence in that piece, without a leading ":" and stripped of  '[]()". ; else the last
    "."-separated piece of the lower-cased, stripped output."""
    if not text:
        return None
    if ARC_DELIMITER in text.lower():
        piece = next(s for s in text.split(".") if ARC_DELIMITER in s.lower())
        return piece.lower().split(ARC_DELIMITER)[-1].lstrip(":").strip(" '[]()\".").rstrip(".")
    return text.lower().strip(" '[]()\".").rstrip(".").split(".")[-1]

def arc_official_correct(answer, gold_text: str) -> bool:
    """The official test: the gold option text (lower-cased, stripped, final period dropped) is a substring of
    the official answer text. Ambiguous when options contain one another ("5" / "15")."""
    return answer is not None and gold_text.lower().strip().rstrip(".") in answer

def answer_segment(text: str):
    """The text after the LAST "the answer is" (any case) up to the end of that line, or None."""
    parts = re.split(ARC_DELIMITER, text, flags=re.IGNORECASE)
    return parts[-1].strip().split("\n")[0] if len(parts) > 1 else None

def _norm(s: str, lower: bool = True) -> str:
    s = re.sub(r"\s+", " ", s.strip().strip(" .:'\"`*()"))
    return s.lower() if lower else s

def _contains(hay: str, needle: str) -> bool:
    """`needle` in `hay` as a whole token: "5" is not in "15", "1.5" is not in "11.5" or "1.55"."""
    return re.search(rf"(?<![\w.]){re.escape(needle)}(?![\w]|\.\d)", hay) is not None

def extract_arc(text: str, options: list):
    """This project's exact rule: the index of the option chosen after the LAST "the answer is", or None:
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
    """The rule used for checkpoint selection: the official rule (GSM8K), the exact option rule (ARC)."""
    if ex.task == "gsm8k":
        return gsm8k_official_equal(extract_gsm8k(text), ex.gold)
    return extract_arc(text, ex.options) == ex.gold_index
