"""Episode rollouts on a scripted sampler: the token sequence, the loss mask and the flags, exact by
construction; chat-template deltas against a rendering of the whole conversation."""

import asyncio

import pytest
import torch

from tether.envs.base import EpisodeError, Feedback
from tether.envs.loading import load_environment_factory
from tether.rollout.batch import Rollout
from tether.rollout.episodes import (
    EPISODE_COLUMNS,
    ChatFormat,
    EpisodeRunner,
    PlainFormat,
    Sampled,
    episode_stats,
    episode_sums,
    episode_tokens,
    episodes_to_rollout,
)
from tether.tasks.tiny_model import build_char_tokenizer

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id


def ids(text):
    return TOK(text, add_special_tokens=False).input_ids


class Echo:
    """Replies 'ok<n>' to each turn; done when the model says 'stop' (reward 1), reward 0.25 per turn."""

    def reset(self, row):
        self.n = 0
        return row["prompt"]

    def step(self, turn):
        self.n += 1
        if "stop" in turn.text:
            return Feedback(reward=1.0, done=True)
        return Feedback(messages=[{"role": "user", "content": f"ok{self.n}"}], reward=0.25)


def scripted(turns_by_call):
    """A sampler that answers call k with turns_by_call[k] (one text per live sequence, EOS appended unless
    the text ends with '|', which marks a turn cut by the limit)."""
    calls = []

    def sample(sequences, max_new_tokens):
        texts = turns_by_call[len(calls)]
        calls.append((sequences, max_new_tokens))
        out = []
        for text in texts[:len(sequences)]:
            cut = text.endswith("|")
            toks = ids(text.rstrip("|")) + ([] if cut else [EOS])
            out.append(Sampled(toks, [-0.5] * len(toks), not cut))
        return out

    sample.calls = calls
    return sample


def runner(env=Echo, **kw):
    opts = dict(max_turns=3, max_tokens=64, max_new_tokens=16)
    opts.update(kw)
    return EpisodeRunner(env, PlainFormat(TOK), TOK, **opts)


def test_sequence_is_opening_then_turns_and_only_model_tokens_carry_loss():
    sample = scripted([["ab", "stop"], ["stop"]])
    eps = runner().run([{"prompt": "Q1"}, {"prompt": "Q2"}], sample)
    e0, e1 = eps
    assert e0.prompt_ids == TOK("Q1").input_ids
    expected = ids("ab") + [EOS] + ids("ok1\n") + ids("stop") + [EOS]
    assert e0.ids == expected
    assert e0.model_mask == [1] * 3 + [0] * 4 + [1] * 5
    assert e0.rewards == [(2, 0.25), (11, 1.0)]  # each turn's reward on its last token
    assert e1.ids == ids("stop") + [EOS] and e1.counts["turns"] == 1
    # Turn 2 sampled only the live episode, from exactly its tokens so far.
    assert sample.calls[1][0] == [e0.prompt_ids + ids("ab") + [EOS] + ids("ok1\n")]
    r = episodes_to_rollout(eps, pad_token_id=TOK.pad_token_id, group_size=1)
    P = r.prompt_len
    assert torch.equal(r.input_ids_BL[0, P:P + len(expected)], torch.tensor(expected))
    assert r.response_mask_BT[0].tolist()[:len(expected)] == e0.model_mask
    assert r.response_mask_BT.sum().item() == 8 + 5
    assert r.attention_mask_BL[0].sum().item() == len(e0.prompt_ids) + len(expected)
    assert r.attention_mask_BL[1].sum().item() == len(e1.prompt_ids) + 5
    # Sampler log-probs on model tokens only.
    assert torch.equal(r.sampler_logprobs_BT != 0, r.response_mask_BT.bool())
    assert r.turn_rewards_BT.sum(-1).tolist() == [1.25, 1.0]
    assert r.completions == ["stop", "stop"]
    assert [m["role"] for m in r.conversations[0]] == ["user", "assistant", "user", "assistant"]


def test_rollout_select_and_concat_keep_the_episode_fields():
    eps = runner().run([{"prompt": "Q"}], scripted([["ab"], ["stop"]]))
    a = episodes_to_rollout(eps, pad_token_id=TOK.pad_token_id, group_size=1)
    b = episodes_to_rollout(runner().run([{"prompt": "QQQ"}], scripted([["stop"]])), pad_token_id=TOK.pad_token_id,
                            group_size=1)
    both = Rollout.concat([a, b], TOK.pad_token_id)
    assert both.turn_rewards_BT.shape == both.response_mask_BT.shape
    assert both.turn_rewards_BT.sum(-1).tolist() == [1.25, 1.0]
    assert both.episode_BK.shape == (2, len(EPISODE_COLUMNS)) and len(both.conversations) == 2
    one = both.select([1])
    assert one.conversations == b.conversations and torch.equal(one.episode_BK, b.episode_BK)


def test_turn_and_token_limits_end_episodes_and_are_flagged():
    eps = runner(max_turns=2).run([{"prompt": "Q"}], scripted([["a"], ["b"]]))
    assert eps[0].counts["turn_limit"] == 1 and eps[0].counts["turns"] == 2
    # No room for the environment's reply and another turn: ended by the token budget, no tokens beyond it.
    eps = runner(max_tokens=6).run([{"prompt": "Q"}], scripted([["abc"]]))
    assert eps[0].counts["token_limit"] == 1 and len(eps[0].ids) == 4
    # A turn cut by the budget keeps only the tokens that fit, flagged.
    eps = runner(max_tokens=3).run([{"prompt": "Q"}], scripted([["abcdef|"]]))
    assert eps[0].ids == ids("abc") and eps[0].counts["token_limit"] == 1
    # The context window counts the opening too.
    r = runner(context_window=len(TOK("Q").input_ids) + 2)
    eps = r.run([{"prompt": "Q"}], scripted([["abcdef|"]]))
    assert len(eps[0].ids) == 2 and eps[0].counts["token_limit"] == 1


def test_a_turn_without_eos_is_closed_by_an_environment_token():
    eps = runner().run([{"prompt": "Q"}], scripted([["ab|"], ["stop"]]))
    assert eps[0].ids[:4] == ids("ab") + [EOS] + ids("o")
    assert eps[0].model_mask[:3] == [1, 1, 0]  # the closing EOS is not the model's


def test_an_environment_that_raises_names_itself_and_the_episode():
    class Broken(Echo):
        def step(self, turn):
            raise ZeroDivisionError("bad env")

    with pytest.raises(EpisodeError, match=r"broken, episode 0 \(row prompt 'Q2'\), turn 0: step\(\) raised "
                                           r"ZeroDivisionError: bad env \(set env.on_error=skip"):
        runner(Broken, env_name="broken").run([{"prompt": "Q2"}], scripted([["a", "b"]]), group_size=2)
    eps = runner(Broken, on_error="skip").run([{"prompt": "Q"}], scripted([["a", "b"]]), group_size=2)
    assert all(e.failed and e.counts["env_failed"] == 1 for e in eps)

    class NoFeedback(Echo):
        def step(self, turn):
            return 3

    with pytest.raises(EpisodeError, match="must return tether.envs.Feedback"):
        runner(NoFeedback).run([{"prompt": "Q"}], scripted([["a"]]))

    class NanReward(Echo):
        def step(self, turn):
            return Feedback(reward=float("nan"), done=True)

    with pytest.raises(EpisodeError, match="non-finite reward"):
        runner(NanReward).run([{"prompt": "Q"}], scripted([["a"]]))


def test_async_environments_are_awaited():
    class Async(Echo):
        async def step(self, turn):
            await asyncio.sleep(0)
            return Echo.step(self, turn)

    eps = runner(Async).run([{"prompt": "Q"}], scripted([["stop"] * 3]), group_size=3)
    assert [e.rewards for e in eps] == [[(4, 1.0)]] * 3


def test_episode_stats_are_per_episode_means_and_token_shares():
    eps = runner(max_turns=2).run([{"prompt": "Q"}, {"prompt": "R"}], scripted([["a", "stop"], ["b"]]))
    r = episodes_to_rollout(eps, pad_token_id=TOK.pad_token_id, group_size=1)
    s = episode_stats(episode_sums(r.episode_BK, r.response_mask_BT))
    env_tokens = len(ids("ok1\n"))
    assert s["episode/turns_mean"] == 1.5 and s["episode/turn_limit_frac"] == 0.5
    assert s["episode/env_token_frac"] == pytest.approx(env_tokens / (env_tokens + 2 + 2 + 5))


def test_written_episodes_tokenize_as_sampled_ones():
    turns = [{"role": "assistant", "content": "ab"}, {"role": "user", "content": "ok1"},
             {"role": "assistant", "content": "stop"}]
    sampled = runner().run([{"prompt": "Q"}], scripted([["ab"], ["stop"]]))[0]
    got, mask = episode_tokens(PlainFormat(TOK), TOK, "Q", turns)
    assert got == sampled.prompt_ids + sampled.ids
    assert mask == [0] * len(sampled.prompt_ids) + sampled.model_mask


CHATML = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def test_chat_deltas_reproduce_the_template_rendering_of_the_whole_conversation():
    tok = build_char_tokenizer()
    tok.chat_template = CHATML
    fmt = ChatFormat(tok, system_prompt="be brief", tools=None)
    r = EpisodeRunner(Echo, fmt, tok, max_turns=3, max_tokens=128, max_new_tokens=16)
    ep = r.run([{"prompt": "hi"}], scripted([["ab"], ["stop"]]))[0]
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "ab"}, {"role": "user", "content": "ok1"},
             {"role": "assistant", "content": "stop"}]
    whole = tok.apply_chat_template(convo, tokenize=False)
    # The model ended its last turn at EOS; the template adds "\n" after it.
    assert ep.prompt_ids + ep.ids == tok(whole, add_special_tokens=False).input_ids[:-1]
    assert ep.conversation == convo
    # Model tokens only: the turns' text and their EOS.
    model = [t for t, m in zip(ep.ids, ep.model_mask) if m]
    assert tok.decode(model) == "ab<|eos|>stop<|eos|>"


def test_chat_format_gives_tools_to_the_template_or_the_system_message():
    from tether.envs.tools import tool_schema

    def f(x: int) -> int:
        """Double.

        Args:
            x: a number
        """
        return 2 * x

    tok = build_char_tokenizer()
    tok.chat_template = CHATML
    plain = ChatFormat(tok, tools=[tool_schema(f)])
    assert not plain.template_tools and '"name": "f"' in plain.system_prompt
    tok.chat_template = "{% if tools %}<|bos|>tools:{{ tools | length }}<|eos|>{% endif %}" + CHATML
    native = ChatFormat(tok, tools=[tool_schema(f)])
    assert native.template_tools and native.system_prompt is None
    assert tok.decode(native.opening("hi")).startswith("<|bos|>tools:1<|eos|>")


def test_environment_factories_load_by_name_module_and_path(tmp_path):
    assert type(load_environment_factory("guess_number")()).__name__ == "GuessNumberEnv"
    f = tmp_path / "myenv.py"
    f.write_text("class E:\n    def __init__(self, k=1): self.k = k\n    def reset(self, row): return 'x'\n"
                 "    def step(self, turn): return None\n")
    assert load_environment_factory(f"{f}:E", {"k": 3})().k == 3
    with pytest.raises(ValueError, match="unknown environment"):
        load_environment_factory("nope")
    with pytest.raises(ValueError, match="constructing it"):
        load_environment_factory(f"{f}:E", {"bad": 1})
    g = tmp_path / "halfenv.py"
    g.write_text("class E:\n    def reset(self, row): return 'x'\n")
    with pytest.raises(ValueError, match="no step method"):
        load_environment_factory(f"{g}:E")
