"""Loading the models of a run: policy, tokenizer, frozen reference, critic (value head), LoRA adapters."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("tether")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the path and what to do."""


def check_model_source(path: str, what: str = "model.path") -> str:
    """The loadable directory or hub name for `path` (a GGUF file or a `builtin:` name is imported first, see
    model_sources.py). Fails early, naming the path, where Hugging Face's own errors would mislead: a missing
    local path ("Repo id must be in the form ..."), a directory that is no model ("Should have a model_type
    key")."""
    from tether.model_sources import ModelSourceError, resolve_model_source

    try:
        path = resolve_model_source(path)
    except ModelSourceError as e:
        raise ModelLoadError(f"{what}: {e}") from None
    p = Path(path).expanduser()
    if p.is_dir():
        if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
            hint = (f"; the model of a checkpoint is its policy/ folder: {p / 'policy'}"
                    if (p / "policy" / "config.json").is_file() or (p / "policy" / "adapter_config.json").is_file()
                    else "; point it at the folder that holds config.json and the weights")
            raise ModelLoadError(f"{what}: {p} has no config.json, so it is not a Hugging Face model directory{hint}")
        return path
    if p.exists():
        raise ModelLoadError(f"{what}: {p} is a file; give the model's directory (config.json and weights)")
    if not _HUB_ID.match(str(path)) or str(path).startswith((".", "~")) or str(path).count("/") > 1:
        raise ModelLoadError(f"{what}: {path} does not exist (neither a local directory nor a hub model name)")
    return path


@contextlib.contextmanager
def _loading(path: str, what: str):
    """Turn Hugging Face's loading errors into one line that names the path and the remedy."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - HF and safetensors raise many types (SafetensorError among them)
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if "trust_remote_code" in text:
            raise ModelLoadError(f"{what}: {path} needs code from its repository (a custom architecture); "
                                 "tether runs none unless model.trust_remote_code=true, which runs that code: "
                                 "set it only for a model you trust") from e
        damaged = _damaged_weights(Path(path))
        if damaged:
            raise ModelLoadError(f"{what}: {damaged}") from e
        if not Path(path).expanduser().exists():
            raise ModelLoadError(f"{what}: {path} is not a local directory, and loading it from the hub failed "
                                 f"({first})") from e
        raise ModelLoadError(f"{what}: {path} could not be loaded ({type(e).__name__}: {first})") from e


def _damaged_weights(directory: Path) -> str | None:
    """The first weights file in `directory` that safetensors cannot open, in words; None if all open."""
    if not directory.is_dir():
        return None
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"{file} is damaged or truncated ({first})"
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The policy's tokenizer, left-padded for generation.

    A tokenizer without a pad token gets its EOS token as pad token. That is safe here because every
    tensor carries an explicit attention / completion mask and completions end at their first EOS, so the
    pad id is never read as data; adding a new token would instead change the vocabulary and the model.
    """
    path = check_model_source(path)
    with _loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {path} has neither a pad token nor an EOS token; give it a pad "
                             "token (tokenizer.pad_token = ...) and save it, then point model.path at it")
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using its EOS token %r as pad (masks are explicit)",
                 tok.eos_token)
    tok.padding_side = "left"
    return tok


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def load_causal_lm(path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   device: torch.device | str = "cpu", disable_dropout: bool = True) -> nn.Module:
    path = check_model_source(path)
    with _loading(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if disable_dropout:
        _disable_dropout(model)
    return model.to(device)


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 DTensor shards (never on a torch build without
    distributed support)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules) -> nn.Module:
    """Wrap the policy with peft LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ReferencePolicy:
    """pi_ref: either a separate frozen model, or the LoRA policy with its adapters switched off.

    The LoRA case keeps one copy of the base weights in memory: the reference is exactly the base model.
    """

    def __init__(self, model: nn.Module | None = None, adapter_host: nn.Module | None = None):
        assert (model is None) != (adapter_host is None)
        self.model = model
        self.adapter_host = adapter_host

    @contextlib.contextmanager
    def active(self):
        if self.model is not None:
            yield self.model
        else:
            with self.adapter_host.disable_adapter():
                yield self.adapter_host


def init_value_head(head: nn.Linear, hidden_size: int) -> None:
    # Small init keeps the first values near 0, so early advantages are close to the raw returns.
    nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5 * 0.1)
    nn.init.zeros_(head.bias)


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.n_embd


class SharedValueHead(nn.Module):
    """A critic that shares the policy's trunk: V(s_t) = w . h_t + b on the policy's last hidden states."""

    def __init__(self, hidden: int):
        super().__init__()
        self.value_head = nn.Linear(hidden, 1)
        init_value_head(self.value_head, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden_states).squeeze(-1).float()


class ValueModel(nn.Module):
    """Critic: a transformer backbone with a scalar head giving V(s_t) at every position."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        init_value_head(self.value_head, hidden_size)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                        disable_dropout: bool = True) -> "ValueModel":
        path = check_model_source(path, "critic")
        with _loading(path, "critic"):
            backbone = AutoModel.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        if disable_dropout:
            _disable_dropout(backbone)
        return cls(backbone, hidden_size(backbone)).to(DTYPES[dtype])

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.value_head(out.last_hidden_state).squeeze(-1).float()

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable()


def context_window(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def copy_frozen(model: nn.Module, dtype: str) -> nn.Module:
    ref = copy.deepcopy(model).to(DTYPES[dtype])
    return freeze(ref)



def merge_lora(adapter_dir: str, out_dir: str, *, base: str | None = None) -> str:
    """Merge a saved LoRA adapter into its base model and save a plain HF model (+ tokenizer) to `out_dir`."""
    import json

    from peft import PeftModel

    adapter = Path(adapter_dir)
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.exists():
        raise ValueError(f"{adapter} holds no adapter_config.json: not a LoRA adapter directory")
    base = base or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError("the adapter does not record its base model; pass --base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else Path(base)
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out_dir)
    return out_dir
