"""Shared fixtures: a tiny random Llama with a real (trained-here) BPE tokenizer and chat template, the shared
SmolLM2-135M-Instruct converted once per machine into a cached HF folder, and the shared data files."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from smollm import SHARED, smollm_folder  # noqa: E402

SHARED_DATA = os.path.join(SHARED, "data")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A small corpus so that the BPE merges cover the words the prompts and answers use.
CORPUS = ["Let's think step by step. The answer is 18. So, the answer is 42. Therefore, the answer is -3.5.",
          "Question: Which is a planet? Options: ['Mars', 'Sun'] Answer: Mars. 1,000 dollars and $18.",
          "Janet has 16 eggs. She eats 3 and bakes 4, so 16 - 3 - 4 = 9 eggs remain. 9 * 2 = 18."] * 20


def run_script(script: str, argv: list, nproc: int = 1, timeout: int = 3600, one_thread: bool = True):
    """Run a repo script as a user would: `python SCRIPT ...`, or `torchrun --nproc_per_node=N SCRIPT ...`
    (gloo on CPU), offline. One thread per process by default, so that runs compared across world sizes
    use the same kernels. Returns the CompletedProcess with text output."""
    import subprocess
    path = os.path.join(ROOT, script)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(launcher + [path, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def build_tokenizer(chat_template: bool = True):
    """A byte-level BPE trained here on CORPUS, ChatML special tokens, eos = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    if chat_template:
        tok.chat_template = CHATML
    return tok


def build_sentencepiece_tokenizer(chat_template=None):
    """A SentencePiece-style tokenizer like Llama-2 / Mistral / Phi-3.5's: Metaspace ("▁" for spaces, one
    prepended to the text), byte fallback, and a BOS that encoding adds. `chat_template`: None (a base model),
    "mistral" ([INST] ... [/INST] answer</s>) or "phi" (turns end with <|end|>, not the eos)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # as in Llama-2 / Mistral / Phi-3.5's tokenizer.json: a "▁" is prepended to the text and replaces spaces
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
    sp.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials + alphabet))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    if chat_template == "mistral":
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                             " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    elif chat_template == "phi":
        tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
                             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    cfg.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or real-model tests (seconds to a minute); run by "
                                       "default, leave out with -m 'not slow'")
    config.addinivalue_line("markers", "long: the long end-to-end runs (the README's commands, the learning run, "
                                       "kills at every instant, multi-process sweeps); left out unless -m names "
                                       "them: `pytest -m long` runs them alone (CI runs both)")


def pytest_collection_modifyitems(config, items):
    """`pytest` leaves the tests marked long out (a newcomer's wait); `pytest -m long` (or any -m naming long)
    runs them."""
    if "long" in (config.getoption("-m") or ""):
        return
    kept = [item for item in items if "long" not in item.keywords]
    config.hook.pytest_deselected(items=[item for item in items if "long" in item.keywords])
    items[:] = kept


@pytest.fixture(scope="session")
def tiny_tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tok):
    """A folder with a tiny random Llama + tokenizer that `from_pretrained` loads (no download)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model(len(tiny_tok), eos_token_id=tiny_tok.eos_token_id, pad_token_id=tiny_tok.pad_token_id)
    model.save_pretrained(path)
    tiny_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm_dir():
    try:
        return smollm_folder()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    except ImportError as e:
        pytest.skip(f"converting the shared GGUF model needs the test-only packages gguf and accelerate: {e}")


def plain_generate(lm, prompts, max_new, pad_id, stop_ids, uniforms=None, tok=None):
    """The plain decode loop the sampling engine must match token for token: Hugging Face's forward with a
    DynamicCache and a 2D padding mask, one token at a time, stops checked after every token."""
    import latro
    from transformers import DynamicCache
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P + max_new, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):P] = 1
    pos = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask[:, :P], position_ids=pos, cache=cache).logits[:, -1]
        out, end = [[] for _ in range(B)], [None] * B
        pos = pos[:, -1:]
        for t in range(max_new):
            nxt = latro.pick_token(logits.float(), None if uniforms is None else uniforms[:, t])
            for i in range(B):
                out[i].append(int(nxt[i]))
                if end[i] is None:
                    end[i] = latro.stop_position(out[i], t, set(stop_ids), tok, final=t == max_new - 1)
            if all(e is not None for e in end):
                break
            mask[:, P + t] = 1
            pos = pos + 1
            logits = lm(input_ids=nxt[:, None], attention_mask=mask[:, :P + t + 1], position_ids=pos,
                        cache=cache).logits[:, -1]
    return [o[:e] if e is not None else o[:max_new] for o, e in zip(out, end)], [e is not None for e in end]
