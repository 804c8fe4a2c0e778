"""FASA: frequency-chunk pairing vs HF RoPE, oracle equivalence with every chunk, calibration file, errors."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tokensieve.kv import KVMethodError, KVSieve
from tokensieve.kv.families import model_info
from tokensieve.kv.fasa_calib import calibrate, load_calibration, write_calibration
from tokensieve.kv.methods.base import Call
from tokensieve.kv.methods.fasa import FASA, fc_dims
from tokensieve.kv.methods.oracle import OracleTopK
from tokensieve.kv.testing import tiny_causal_lm

FAST = {"n_fc": 4, "calib_len": 128, "calib_seqs": 1}
_M: dict = {}


def model():
    if "m" not in _M:
        _M["m"] = tiny_causal_lm()
    return _M["m"]


@pytest.mark.parametrize("pairing,planes", [("rotate_half", True), ("adjacent", False)])
def test_rotate_half_pairing_matches_hf_rope_planes(pairing, planes):
    m, d = model(), 16
    cos, sin = m.model.rotary_emb(torch.zeros(1, 1, 1, d), torch.tensor([[7]]))
    inv_freq = m.model.rotary_emb.inv_freq
    for f in range(d // 2):
        dims = fc_dims(torch.tensor([f]), d, pairing)
        x = torch.zeros(1, 1, 1, d)
        x[..., dims] = torch.tensor([1.0, 0.5])
        rot, _ = apply_rotary_pos_emb(x, x, cos, sin)
        outside = rot.clone()
        outside[..., dims] = 0
        in_plane = bool(outside.abs().max() < 1e-6)
        if planes:
            assert in_plane
            start = torch.atan2(torch.tensor(0.5), torch.tensor(1.0))
            angle = torch.atan2(rot[0, 0, 0, dims[1]], rot[0, 0, 0, dims[0]]) - start
            want = torch.tensor(7 * float(inv_freq[f]))
            assert torch.allclose(torch.remainder(angle - want + torch.pi, 2 * torch.pi), torch.tensor(torch.pi),
                                  atol=1e-4)
        elif f > 0:
            assert not in_plane


def _call(m, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    return Call(q=q, k=k, v=k, q_pos=torch.tensor([n - 1]), k_rope=torch.arange(n), q_rope=torch.tensor([n - 1]),
                phase="decode", layer=1, keep=12, n_context=n, scaling=0.25, model=m, info=model_info(m), state={},
                slot=(1, 0))


@pytest.mark.parametrize("pairing", ["rotate_half", "adjacent"])
def test_all_chunks_equal_exact_per_head_oracle(pairing):
    m = model()
    fasa = FASA(n_fc=8, pairing=pairing, calib_len=64, calib_seqs=1)
    fasa.prepare(m, model_info(m), 12)
    call = _call(m)
    got = fasa.plan(call)[0].idx.sort(-1).values
    want = OracleTopK().plan(call)[0].idx.sort(-1).values
    assert got.shape == (4, 12) and torch.equal(got, want)


def test_calibration_is_deterministic_and_file_round_trips(tmp_path):
    m = model()
    a = calibrate(m, budget=16, n_seqs=1, length=96, seed=3)
    b = calibrate(m, budget=16, n_seqs=1, length=96, seed=3)
    assert torch.equal(a["ca"], b["ca"]) and a["ca"].shape == (2, 4, 8)
    assert ((a["ca"] >= 0) & (a["ca"] <= 1)).all()
    path = write_calibration(m, tmp_path, budget=16, n_seqs=1, length=96, seed=3)
    assert path.name == "fasa_rotate_half.pt" and torch.equal(load_calibration(path)["ca"], a["ca"])
    x = torch.randint(1, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), KVSieve(m, "fasa", keep=16, n_fc=4, dims=str(path)) as s:
        m.generate(x, max_new_tokens=3, do_sample=False)
    assert s.trace.kv_selected(1, 1).shape == (1, 4, 16)  # per query head
    assert s.trace.kv_selected(0, 1).shape == (1, 1, 81)  # layer 0 dense
    with pytest.raises(KVMethodError, match="pairing"), KVSieve(m, "fasa", keep=16, n_fc=4, pairing="adjacent",
                                                                 dims=str(path)):
        pass


def test_dense_when_keep_covers_context_and_errors():
    m = model()
    x = torch.randint(1, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m.generate(x, max_new_tokens=3, do_sample=False)
        with KVSieve(m, "fasa", keep=200, **FAST):
            assert torch.equal(m.generate(x, max_new_tokens=3, do_sample=False), ref)
    norope = tiny_causal_lm(seed=1)
    del norope.model.rotary_emb
    with pytest.raises(KVMethodError, match="RoPE"):
        KVSieve(norope, "fasa", keep=16)
    with pytest.raises(KVMethodError, match="n_fc"):
        KVSieve(m, "fasa", keep=16, n_fc=9)
