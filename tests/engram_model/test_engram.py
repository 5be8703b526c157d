"""EngramLayer and the LM against plain references; causality; incremental decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engram_model.engram import EngramConfig, EngramLayer
from engram_model.errors import EngramConfigError
from engram_model.model import EngramLM, InferenceCache, ModelConfig, table_name

torch.set_num_threads(1)


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_engram(layer: EngramLayer, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """docs/engram.md steps 4-6 written per position and per tap (slow, obvious). h: (B, T, M, d)."""
    cfg = layer.cfg
    B, T, M, d = h.shape
    N, K = cfg.max_ngram_size, cfg.kernel_size
    e = rows.reshape(B, T, -1)
    v = e @ layer.value_proj.weight.T + layer.value_proj.bias
    u = torch.zeros(B, T, M, d)
    for m in range(M):
        k = _rms(e @ layer.key_projs[m].weight.T + layer.key_projs[m].bias, layer.norm_key[m].weight, cfg.norm_eps)
        q = _rms(h[:, :, m], layer.norm_query[m].weight, cfg.norm_eps)
        for b in range(B):
            for t in range(T):
                g = float((k[b, t] * q[b, t]).sum()) / math.sqrt(d)
                if cfg.signed_sqrt:
                    g = math.copysign(math.sqrt(max(abs(g), 1e-6)), g)
                u[b, t, m] = v[b, t] / (1 + math.exp(-g))
    xn = torch.stack([_rms(u[:, :, m], layer.norm_conv[m].weight, cfg.norm_eps) for m in range(M)], 2).reshape(B, T, M * d)
    w = layer.conv.weight[:, 0, :]  # (M*d, K)
    conv = torch.zeros(B, T, M * d)
    for t in range(T):
        for j in range(K):  # tap j reads position t - (K-1-j)*N
            src = t - (K - 1 - j) * N
            if src >= 0:
                conv[:, t] += w[:, j] * xn[:, src]
    return u + torch.nn.functional.silu(conv).view(B, T, M, d)


@pytest.mark.parametrize("M,signed", [(1, True), (2, True), (1, False)])
def test_layer_matches_reference(M, signed):
    torch.manual_seed(0)
    cfg = EngramConfig(d_model=16, max_ngram_size=3, n_head_per_ngram=2, d_mem=8, branches=M, signed_sqrt=signed)
    layer = EngramLayer(cfg, head_sizes=[11, 13, 17, 19])
    with torch.no_grad():
        layer.conv.weight.normal_()  # zero-init would hide the conv; test it for real
        for n in [*layer.norm_key, *layer.norm_query, *layer.norm_conv]:
            n.weight.uniform_(0.5, 1.5)
    B, T = 2, 14
    h = torch.randn(B, T, M, 16)
    rows = torch.randn(B, T, cfg.n_heads, cfg.d_head)
    with torch.no_grad():
        got = layer(h, rows)
        want = reference_engram(layer, h, rows)
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"max |fast - reference| = {err}"


def test_zero_init_conv_gives_gated_value_and_causality():
    torch.manual_seed(1)
    cfg = EngramConfig(d_model=8, n_head_per_ngram=2, d_mem=4)
    layer = EngramLayer(cfg, head_sizes=[5, 7, 11, 13])
    assert torch.count_nonzero(layer.conv.weight) == 0
    h, rows = torch.randn(1, 12, 8), torch.randn(1, 12, 4, 2)
    with torch.no_grad():
        y = layer(h, rows)
        layer.conv.weight.normal_()
        y2 = layer(h, rows)
        h_b, rows_b = h.clone(), rows.clone()
        h_b[:, 7:] += 1.0
        rows_b[:, 7:] -= 1.0
        y3 = layer(h_b, rows_b)
    assert y.shape == h.shape
    assert torch.equal(y2[:, :7], y3[:, :7]), "output at t depends on positions > t"
    assert not torch.equal(y2[:, 7:], y3[:, 7:])
    with pytest.raises(EngramConfigError):
        EngramConfig(d_model=8, d_mem=10, n_head_per_ngram=4)


def _tiny(engram_layers=(0, 2), **kw):
    V, Vc = 300, 180
    cfg = ModelConfig(vocab_size=V, n_layer=3, n_head=2, d_model=32, d_ff=48, max_seq_len=64,
                      engram_layers=list(engram_layers), engram_vocab_size=Vc, engram_pad_id=1,
                      engram_heads=2, engram_d_mem=8, **kw)
    lut = np.arange(V) % Vc
    return EngramLM(cfg, lut if engram_layers else None)


@pytest.mark.parametrize("kw", [{}, {"engram_branches": 2}, {"n_expert": 3, "moe_top_k": 2}])
def test_incremental_decode_matches_full_forward(kw):
    torch.manual_seed(2)
    m = _tiny(**kw).eval()
    with torch.no_grad():
        for blk in m.engram_blocks():
            blk.engram.conv.weight.normal_(std=0.3)
        idx = torch.randint(0, 300, (2, 30))
        full, _ = m(idx)
        cache = InferenceCache(m, 2)
        parts = [m(idx[:, :11], cache=cache)[0], m(idx[:, 11:17], cache=cache)[0]]
        parts += [m(idx[:, t : t + 1], cache=cache)[0] for t in range(17, 30)]
    err = (torch.cat(parts, 1) - full).abs().max().item()
    assert err < 1e-4, f"max |incremental - full| = {err}"


def test_names_params_and_row_ids():
    m = _tiny()
    names = [n for n, _ in m.named_parameters() if n.endswith("engram.memory.weight")]
    assert names == [table_name(0), table_name(2)]
    assert all(p.numel() > 0 for p in m.table_parameters())
    tabs = {n for n, _ in m.named_parameters()} & set(names)
    assert {n for n, p in m.named_parameters() if p in set(m.dense_parameters())}.isdisjoint(tabs)
    idx = torch.randint(0, 300, (2, 9))
    ids = m.row_ids(idx)
    per_head = m.hasher.hash(m.compress[idx].numpy())
    for i in (0, 2):
        want = per_head[i] + m.hasher.head_offsets(i)
        np.testing.assert_array_equal(ids[i].numpy(), want)
        assert int(ids[i].max()) < m.hasher.total_rows(i)
    # hashing a continuation with its context equals slicing the full hash
    cont = m.row_ids(idx[:, 5:], prev=idx[:, 3:5])
    assert torch.equal(cont[0], ids[0][:, 5:])
    counts = m.num_params()
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["tables"] == sum(m.hasher.total_rows(i) for i in (0, 2)) * 4


def test_sparse_grads_and_learning():
    torch.manual_seed(3)
    m = _tiny()
    idx = torch.randint(0, 300, (4, 24))
    opt_d = torch.optim.AdamW(m.dense_parameters(), lr=3e-3)
    opt_s = torch.optim.SparseAdam(m.table_parameters(), lr=1.5e-2)
    losses = []
    for _ in range(15):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt_d.zero_grad()
        opt_s.zero_grad()
        loss.backward()
        assert all(p.grad.is_sparse for p in m.table_parameters())
        opt_d.step()
        opt_s.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_config_validation():
    with pytest.raises(EngramConfigError):
        ModelConfig(engram_layers=[1], engram_vocab_size=0)
    with pytest.raises(EngramConfigError):
        ModelConfig(n_layer=2, engram_layers=[2], engram_vocab_size=10)
    with pytest.raises(EngramConfigError):
        ModelConfig(d_model=30, n_head=4, engram_layers=[])
    with pytest.raises(EngramConfigError):
        EngramLM(ModelConfig(vocab_size=10, engram_layers=[0], engram_vocab_size=5, n_layer=1))
