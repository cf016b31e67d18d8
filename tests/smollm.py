"""The shared SmolLM2-135M-Instruct (../shared/models, a GGUF file) as a plain Hugging Face folder.

Loading a GGUF file takes ~40 s and needs the test-only packages gguf and accelerate; the converted folder
loads in 1-2 s with neither. So convert once per machine into a cache folder (LATRO_TEST_CACHE, default
~/.cache/latro-tests) and load that. `python tests/smollm.py` converts if needed and prints the folder.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LATRO_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
GGUF = os.path.join(SHARED, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
CACHE = os.environ.get("LATRO_TEST_CACHE", os.path.expanduser("~/.cache/latro-tests"))


def smollm_folder() -> str:
    out = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    if not os.path.isfile(GGUF):
        raise FileNotFoundError(f"shared model {GGUF} is absent")
    import gguf  # noqa: F401  (both are needed by transformers' GGUF reader; fail here with their names)
    import accelerate  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None  # the 4-bit weights were expanded to fp32: nothing quantized is left
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(CACHE, exist_ok=True)
    if os.path.exists(out):  # an unfinished earlier conversion
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)  # whole or absent: a crash mid-conversion leaves no half folder behind
    return out


if __name__ == "__main__":
    sys.stdout.write(smollm_folder() + "\n")
