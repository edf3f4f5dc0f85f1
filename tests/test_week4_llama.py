"""Week 4, notebooks 04-05: the Llama model matches transformers, generation and the KV cache behave,
and every check (4.8-4.11) fails on plausible wrong answers and passes correct alternatives."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import generate as G
from course_utils import llama as L
from course_utils.attention import causal_mask, rope


# ----------------------------------------------------------------------------------------------
# 4.8 repeat_kv: wrong versions and correct alternatives
# ----------------------------------------------------------------------------------------------
def repeat_kv_tiled(x, n_rep):  # kv0, kv1, kv0, kv1: query head h reads kv head h % nkv
    return x.repeat(1, n_rep, 1, 1)


def repeat_kv_expand_before(x, n_rep):  # the same tiling, via expand on a new axis BEFORE the kv axis
    B, nkv, S, hs = x.shape
    return x[:, None].expand(B, n_rep, nkv, S, hs).reshape(B, nkv * n_rep, S, hs)


def repeat_kv_time_axis(x, n_rep):  # repeats positions instead of heads
    return x.repeat_interleave(n_rep, dim=2)


def repeat_kv_float32_buffer(x, n_rep):  # right order, but the buffer's default dtype loses float64
    B, nkv, S, hs = x.shape
    out = torch.zeros(B, nkv * n_rep, S, hs)
    for h in range(nkv * n_rep):
        out[:, h] = x[:, h // n_rep]
    return out


def repeat_kv_interleave(x, n_rep):
    return torch.repeat_interleave(x, n_rep, dim=1)


def repeat_kv_index(x, n_rep):
    return x.index_select(1, torch.arange(x.shape[1]).repeat_interleave(n_rep))


def repeat_kv_loop(x, n_rep):
    return torch.cat([x[:, h:h + 1] for h in range(x.shape[1]) for _ in range(n_rep)], dim=1)


# ----------------------------------------------------------------------------------------------
# 4.9 top-k
# ----------------------------------------------------------------------------------------------
def top_k_off_by_one(logits, k):  # keeps k + 1 tokens
    kth = torch.sort(logits, dim=-1, descending=True).values[..., min(k, logits.shape[-1] - 1), None]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_smallest(logits, k):  # keeps the k LEAST likely
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1, largest=False).values[..., -1:]
    return logits.masked_fill(logits > kth, float("-inf"))


def top_k_zero_fill(logits, k):  # "removes" tokens by setting them to 0: they keep probability e^0
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


def top_k_returns_probs(logits, k):  # returns renormalised probabilities instead of logits
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)


def top_k_no_clamp(logits, k):  # torch.topk raises for k > V
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_scatter(logits, k):
    k = min(k, logits.shape[-1])
    values, idx = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, values)


def top_k_sort_threshold(logits, k):
    s = torch.sort(logits, dim=-1).values  # ascending
    kth = s[..., max(logits.shape[-1] - k, 0)].unsqueeze(-1)
    return torch.where(logits >= kth, logits, torch.tensor(float("-inf")))


# ----------------------------------------------------------------------------------------------
# 4.10 top-p
# ----------------------------------------------------------------------------------------------
def _top_p(logits, p, *, rule, descending=True, unsort=True, use_probs=True):
    s, order = torch.sort(logits, dim=-1, descending=descending)
    probs = torch.softmax(s, -1) if use_probs else s
    cum = probs.cumsum(-1)
    keep_sorted = rule(cum, probs, p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) if unsort else keep_sorted
    return logits.masked_fill(~keep, float("-inf"))


def top_p_drops_crossing_token(logits, p):
    return _top_p(logits, p, rule=lambda cum, probs, p: cum <= p)


def top_p_ascending(logits, p):  # sorts ascending: keeps the LEAST likely tokens
    return _top_p(logits, p, rule=lambda cum, probs, p: cum - probs < p, descending=False)


def top_p_forgets_unsort(logits, p):  # applies the sorted mask to the unsorted logits
    return _top_p(logits, p, rule=lambda cum, probs, p: cum - probs < p, unsort=False)


def top_p_on_logits(logits, p):  # cumulative sum of raw logits instead of probabilities
    return _top_p(logits, p, rule=lambda cum, probs, p: cum - probs < p, use_probs=False)


def top_p_renormalised(logits, p):  # returns log of the renormalised kept probabilities, not the logits
    kept = G.top_p_filter(logits, p)
    return torch.log_softmax(kept, dim=-1)


def top_p_like_transformers(logits, p):  # ascending sort, remove what lies in the bottom 1 - p
    s, order = torch.sort(logits, dim=-1)
    remove_sorted = s.softmax(-1).cumsum(-1) <= 1 - p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def top_p_row_loop(logits, p):
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        probs = torch.softmax(logits[r], -1)
        total = 0.0
        for i in torch.argsort(logits[r], descending=True).tolist():
            out[r, i] = logits[r, i]
            total += probs[i].item()
            if total >= p:
                break
    return out


# ----------------------------------------------------------------------------------------------
# 4.11 one attention step with a KV cache
# ----------------------------------------------------------------------------------------------
def _step(q, k, v, past_k, past_v, base, *, positions, append=1, causal=True, rotate_v=False):
    S, T = past_k.shape[-2], q.shape[-2]
    pos = positions(S, T)
    q, k = rope(q, pos, base), rope(k, pos, base)
    if rotate_v:
        v = rope(v, pos, base)
    k_all = torch.cat([past_k] + [k] * append, dim=-2) if append else past_k
    v_all = torch.cat([past_v] + [v] * append, dim=-2) if append else past_v
    keys, values = (k_all, v_all) if append else (torch.cat([past_k, k], -2), torch.cat([past_v, v], -2))
    mask = causal_mask(T, keys.shape[-2]) if causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), k_all, v_all


def kv_step_forgets_append(q, k, v, past_k, past_v, base=10000.0):  # attends correctly, returns the old cache
    return _step(q, k, v, past_k, past_v, base, positions=lambda S, T: torch.arange(S, S + T), append=0)


def kv_step_appends_twice(q, k, v, past_k, past_v, base=10000.0):
    return _step(q, k, v, past_k, past_v, base, positions=lambda S, T: torch.arange(S, S + T), append=2)


def kv_step_rope_from_zero(q, k, v, past_k, past_v, base=10000.0):  # every step thinks it is at position 0
    return _step(q, k, v, past_k, past_v, base, positions=lambda S, T: torch.arange(T))


def kv_step_rope_off_by_one(q, k, v, past_k, past_v, base=10000.0):
    return _step(q, k, v, past_k, past_v, base, positions=lambda S, T: torch.arange(S + 1, S + T + 1))


def kv_step_no_causal_mask(q, k, v, past_k, past_v, base=10000.0):  # fine for T = 1, wrong for a prefill
    return _step(q, k, v, past_k, past_v, base, positions=lambda S, T: torch.arange(S, S + T), causal=False)


def kv_step_rotates_values(q, k, v, past_k, past_v, base=10000.0):
    return _step(q, k, v, past_k, past_v, base, positions=lambda S, T: torch.arange(S, S + T), rotate_v=True)


def kv_step_preallocated(q, k, v, past_k, past_v, base=10000.0):
    B, nh, S, hs = past_k.shape
    T = q.shape[-2]
    k_all, v_all = past_k.new_empty(B, nh, S + T, hs), past_v.new_empty(B, nh, S + T, hs)
    k_all[..., :S, :], v_all[..., :S, :] = past_k, past_v
    pos = torch.arange(S, S + T)
    k_all[..., S:, :], v_all[..., S:, :] = rope(k, pos, base), v
    q = rope(q, pos, base)
    allowed = torch.arange(S + T)[None, :] <= pos[:, None]  # (T, S + T)
    w = (q @ k_all.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~allowed, float("-inf")).softmax(-1)
    return w @ v_all, k_all, v_all


def kv_step_via_full_sequence(q, k, v, past_k, past_v, base=10000.0):  # einsum, explicit cos/sin
    S, T, hs = past_k.shape[-2], q.shape[-2], q.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, hs, 2).float() / hs)
    ang = torch.arange(S, S + T).float()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(x):
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    k_all, v_all = torch.cat([past_k, rot(k)], -2), torch.cat([past_v, v], -2)
    scores = torch.einsum("bhtd,bhsd->bhts", rot(q), k_all) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, S + T, dtype=torch.bool).triu(S + 1), float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v_all), k_all, v_all


WRONG_IMPLEMENTATIONS = {
    "4.8": [repeat_kv_tiled, repeat_kv_expand_before, repeat_kv_time_axis, repeat_kv_float32_buffer],
    "4.9": [top_k_off_by_one, top_k_smallest, top_k_zero_fill, top_k_returns_probs, top_k_no_clamp],
    "4.10": [top_p_drops_crossing_token, top_p_ascending, top_p_forgets_unsort, top_p_on_logits, top_p_renormalised],
    "4.11": [kv_step_forgets_append, kv_step_appends_twice, kv_step_rope_from_zero, kv_step_rope_off_by_one,
             kv_step_no_causal_mask, kv_step_rotates_values],
}

CORRECT_ALTERNATIVES = {
    "4.8": [repeat_kv_interleave, repeat_kv_index, repeat_kv_loop],
    "4.9": [top_k_scatter, top_k_sort_threshold],
    "4.10": [top_p_like_transformers, top_p_row_loop],
    "4.11": [kv_step_preallocated, kv_step_via_full_sequence],
}


def test_week4_generation_exercises_registered():
    from course_utils import list_exercises

    assert {"4.8", "4.9", "4.10", "4.11"} <= set(list_exercises(4))


# ----------------------------------------------------------------------------------------------
# Decoding rules against transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 50, 100])
@pytest.mark.parametrize("shape", [(1, 50), (4, 50)])
def test_top_k_matches_transformers(k, shape):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(k)) * 3
    torch.testing.assert_close(G.top_k_filter(logits, k), TopKLogitsWarper(top_k=k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_top_p_matches_transformers(p, scale):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(int(p * 1000))) * scale
    torch.testing.assert_close(G.top_p_filter(logits, p), TopPLogitsWarper(top_p=p)(None, logits.clone()))


def test_temperature_zero_is_greedy_and_top_k_one_is_greedy():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    assert torch.equal(G.sample_next(logits, temperature=0.0), greedy)
    assert torch.equal(G.sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(G.sample_next(logits, temperature=0.7, top_p=1e-6), greedy)


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(1)
    for temperature in (0.5, 1.0, 2.0):
        ids = G.sample_next(logits, temperature=temperature, generator=g)
        freq = torch.bincount(ids, minlength=4).float() / len(ids)
        expected = torch.softmax(logits[0] / temperature, -1)
        assert (freq - expected).abs().max() < 0.015, (temperature, freq, expected)


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(5000, 4)
    ids = G.sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(2))
    assert set(ids.tolist()) == {0, 1}  # 0.5 < 0.7, so the crossing token (0.3) is kept, 0.15 is not


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        G.apply_temperature(torch.zeros(1, 3), -1.0)


# ----------------------------------------------------------------------------------------------
# A tiny random Llama against transformers (fast)
# ----------------------------------------------------------------------------------------------
def _tiny_pair(seed=0, **overrides):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf_cfg = HFConfig(**{**kwargs, **overrides})
    hf = LlamaForCausalLM(hf_cfg).eval()
    return L.Llama.from_hf(hf), hf


def test_config_from_hf_reads_every_size():
    ours, hf = _tiny_pair()
    c = ours.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.max_seq_len) == \
        (96, 64, 2, 4, 2, 112, 64)
    assert c.tie_embeddings and c.rope_base == 10000.0 and c.head_size == 16


@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (3, 12)])
def test_tiny_llama_logits_match_transformers(B, T):
    ours, hf = _tiny_pair()
    idx = torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_one_matrix():
    ours, _ = _tiny_pair()
    assert ours.lm_head.weight is ours.tok_emb.weight


def test_decoding_layout_changes_strides_not_values():
    ours, hf = _tiny_pair()
    plain = L.Llama.from_hf(hf, decoding_layout=False)
    assert ours.blocks[0].mlp.w_up.weight.stride() == (1, 112) and plain.blocks[0].mlp.w_up.weight.stride() == (64, 1)
    assert ours.lm_head.weight is ours.tok_emb.weight  # still tied after the layout change
    idx = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), plain(idx), atol=1e-6, rtol=1e-6)
    assert ours.state_dict()["blocks.0.mlp.w_up.weight"].shape == (112, 64)


def test_repeat_kv_matches_transformers():
    from transformers.models.llama.modeling_llama import repeat_kv

    x = torch.randn(2, 3, 5, 4)
    for n_rep in (1, 2, 3):
        assert torch.equal(L.repeat_kv(x, n_rep), repeat_kv(x, n_rep))


def test_gqa_with_repeated_heads_equals_fused_gqa():
    ours, _ = _tiny_pair()
    idx = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        fused = ours(idx)
        explicit, internals = ours(idx, return_internals=True)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    assert len(internals["attn"]) == 2 and internals["attn"][0].shape == (2, 4, 9, 9)
    assert len(internals["hidden"]) == 3
    torch.testing.assert_close(internals["attn"][0].sum(-1), torch.ones(2, 4, 9))
    assert internals["attn"][1].triu(1).abs().max() == 0  # causal: nothing above the diagonal


@pytest.mark.parametrize("use_cache", [True, False])
def test_tiny_greedy_generation_matches_transformers(use_cache):
    ours, hf = _tiny_pair(seed=3)
    idx = torch.randint(3, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    mine = G.generate(ours, idx, 20, use_cache=use_cache)
    theirs = hf.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine, theirs)


def test_cached_and_uncached_greedy_are_identical():
    ours, _ = _tiny_pair(seed=5)
    idx = torch.randint(3, 96, (2, 6))
    assert torch.equal(G.generate(ours, idx, 25, use_cache=True), G.generate(ours, idx, 25, use_cache=False))


def test_cache_grows_by_exactly_one_position_per_step():
    ours, _ = _tiny_pair()
    cache = G.KVCache()
    idx = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        logits = ours(idx, cache=cache)
        assert cache.layer_lengths() == [7, 7]
        for step in range(1, 6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
            logits = ours(nxt, cache=cache)
            assert cache.layer_lengths() == [7 + step] * 2
            torch.testing.assert_close(logits[:, -1], ours(idx)[:, -1], atol=1e-5, rtol=1e-5)  # the cache is USED


def test_generate_feeds_one_token_per_step_with_the_cache():
    ours, _ = _tiny_pair()
    lengths = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.inner = ours.config, ours

        def forward(self, idx, **kwargs):
            lengths.append((idx.shape[1], kwargs["cache"].length if kwargs["cache"] is not None else None))
            return self.inner(idx, **kwargs)

    G.generate(Spy(), torch.randint(3, 96, (1, 4)), 5)
    assert lengths == [(4, 0), (1, 4), (1, 5), (1, 6), (1, 7)]
    lengths.clear()
    G.generate(Spy(), torch.randint(3, 96, (1, 4)), 3, use_cache=False)
    assert lengths == [(4, None), (5, None), (6, None)]


def test_a_model_that_ignores_the_cache_is_caught():
    """The symptom of a silently unused cache: the cached step's logits differ from the full forward."""
    ours, _ = _tiny_pair()
    idx = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        full = ours(idx)[:, -1]
        stepped = ours(idx[:, -1:])[:, -1]  # no cache given: the model sees one token without its past
    assert (full - stepped).abs().max() > 1e-3


def test_batched_left_padding_equals_one_at_a_time():
    ours, hf = _tiny_pair(seed=7)
    prompts = [[5, 9, 13, 17, 21, 25, 29], [40, 41], [60, 7, 8, 9]]
    ids, mask = G.left_pad(prompts, pad_id=0)
    batched = G.generate(ours, ids, 12, attention_mask=mask)
    for b, p in enumerate(prompts):
        alone = G.generate(ours, torch.tensor([p]), 12)
        assert batched[b, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(batched, theirs)


def test_pick_decode_threads_sets_the_faster_count():
    ours, _ = _tiny_pair()
    before = torch.get_num_threads()
    try:
        n = G.pick_decode_threads(ours, torch.randint(3, 96, (1, 4)), steps=2)
        assert n >= 1 and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


def test_left_pad_shapes():
    ids, mask = G.left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_eos_stops_and_pads():
    ours, _ = _tiny_pair(seed=1)
    idx = torch.randint(3, 96, (2, 4))
    free = G.generate(ours, idx, 8)
    eos = int(free[0, 5])  # the 2nd token row 0 generates: declare it the end-of-sequence token
    out = G.generate(ours, idx, 8, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 4:].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, 4: 4 + row0.index(eos) + 1].tolist()
    assert all(t == 0 for t in row0[row0.index(eos) + 1:])


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_prompt_longer_than_the_context_is_a_clear_error():
    model = L.Llama(dataclasses.replace(L.LlamaConfig.tiny(), max_seq_len=16)).eval()
    with pytest.raises(ValueError, match="context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="context is 16"):
        G.generate(model, torch.zeros(1, 10, dtype=torch.long), 7)
    cache = G.KVCache()
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="16 cached"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_missing_and_unexpected_keys_are_listed():
    ours, hf = _tiny_pair()
    sd = hf.state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    with pytest.raises(KeyError) as err:
        L.Llama(ours.config).load_hf_state_dict(sd)
    assert "blocks.1.mlp.w_up.weight" in str(err.value)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in str(err.value)


def test_shape_mismatch_is_a_clear_error():
    ours, hf = _tiny_pair()
    wrong = L.Llama(dataclasses.replace(ours.config, hidden_dim=100))
    with pytest.raises(ValueError, match="shape mismatch"):
        wrong.load_hf_state_dict(hf.state_dict())


def test_untied_checkpoint_needs_lm_head():
    ours, hf = _tiny_pair(tie_word_embeddings=False)
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.tok_emb.weight
    sd = hf.state_dict()
    del sd["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head.weight"):
        L.Llama(ours.config).load_hf_state_dict(sd)


def test_unsupported_hf_features_are_refused():
    from transformers import LlamaConfig as HFConfig

    with pytest.raises(ValueError, match="attention_bias"):
        L.LlamaConfig.from_hf_config(HFConfig(attention_bias=True))


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (loads from the course cache: seconds)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    from course_utils.data import MissingDataError

    try:
        ours, hf, tok = L.load_smollm2_from_scratch()
    except MissingDataError as exc:
        pytest.skip(str(exc))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 decoding gains little from threads and loses a lot on a busy machine
    yield ours, hf, tok
    torch.set_num_threads(before)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "1, 2, 3, 4, 5,"]


@pytest.mark.slow
def test_smollm2_config_preset(smollm2):
    ours, hf, _ = smollm2
    assert L.LlamaConfig.from_hf_config(hf.config) == L.LlamaConfig.smollm2_135m()


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    ours, hf, tok = smollm2
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        assert (a - b).abs().max().item() <= 1e-4, prompt
        assert torch.equal(a.argmax(-1), b.argmax(-1)), prompt


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_match_transformers_generate(smollm2):
    ours, hf, tok = smollm2
    ids = tok("Once upon a time, in a land far away,", return_tensors="pt").input_ids
    mine = G.generate(ours, ids, 64)
    theirs = hf.generate(ids, max_new_tokens=64, do_sample=False)
    assert mine.shape[1] == ids.shape[1] + 64
    assert torch.equal(mine, theirs)


@pytest.mark.slow
def test_smollm2_batched_left_padding_equals_one_at_a_time(smollm2):
    ours, _, tok = smollm2
    prompts = [tok(p).input_ids for p in PROMPTS[:3]]
    ids, mask = G.left_pad(prompts, pad_id=tok.pad_token_id)
    batched = G.generate(ours, ids, 8, attention_mask=mask)
    for b, p in enumerate(prompts):
        alone = G.generate(ours, torch.tensor([p]), 8)
        assert batched[b, ids.shape[1]:].tolist() == alone[0, len(p):].tolist()
