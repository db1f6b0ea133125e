"""The pipeline's SFT cache: reused for the same task, rebuilt when the task's demonstrations change."""

from tether.config import resolve_config
from tether.pipeline import prepare_sft_model
from tether.tasks.arithmetic import ArithmeticTask


def test_changed_demonstrations_build_a_new_sft_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    cfg = resolve_config({"task": {"name": "arithmetic", "sft_steps": 1}}, [])
    first, _ = prepare_sft_model(cfg, echo=lambda m: None)
    messages = []
    again, _ = prepare_sft_model(cfg, echo=messages.append)
    assert again == first and any("Using cached model" in m for m in messages)

    demonstrate = ArithmeticTask._demonstrate
    monkeypatch.setattr(ArithmeticTask, "_demonstrate",
                        lambda self, problem, rng: (demonstrate(self, problem, rng)[0] + " ", False))
    changed, _ = prepare_sft_model(cfg, echo=lambda m: None)
    assert changed != first and changed.exists() and first.exists()
