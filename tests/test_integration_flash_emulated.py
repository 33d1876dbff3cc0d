"""The flash_attention_2 path through transformers' own FlashAttention plumbing (unpadding,
cu_seqlens, packed-sequence detection), with the two flash-attn kernels replaced by exact PyTorch
stand-ins so it runs on a CPU without flash-attn. What this checks is TopV's side of the contract:
the 2-D masks and ``position_ids=None`` it hands pruned layers, under gapped positions and a
shorter per-layer cache; the real kernels are exercised only on a machine that has flash-attn."""

import pytest
import torch
from integration_support import check_against_reference

from topv.testing import tiny_models as tm

fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
if not all(hasattr(fa, n) for n in ("_flash_fn", "_flash_varlen_fn", "_loaded_implementation", "_pad_input",
                                    "_unpad_input", "_lazy_define_process_function")):
    pytest.skip("this transformers version has other FlashAttention internals", allow_module_level=True)


def _attend(q, k, v, scale, causal):
    # q (Lq, H, d), k/v (Lk, Hk, d); flash-attn's causal mask is aligned bottom-right.
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        Lq, Lk = q.shape[0], k.shape[0]
        allowed = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    scale = softmax_scale or q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, **kw):
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(cu_seqlens_q.numel() - 1):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        c, d = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        out[a:b] = _attend(q[a:b], k[c:d], v[c:d], scale, causal)
    return out


@pytest.fixture()
def emulated_flash():
    names = ("_flash_fn", "_flash_varlen_fn", "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn", "_loaded_implementation")
    saved = {n: getattr(fa, n, None) for n in names}
    fa._flash_fn, fa._flash_varlen_fn = flash_attn_func, flash_attn_varlen_func
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._loaded_implementation = "flash_attention_2"
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(fa, n, v)


def _flash(model):
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation_internal = "flash_attention_2"
    return model


PLACEMENTS = {"after_k": dict(kv="after_k"), "all": dict(kv="all"), "vision": dict(stage="vision"),
              "vision/compact": dict(stage="vision", positions="compact")}


@pytest.mark.parametrize("kv,method", [(kv, m) for kv in ("after_k", "all") for m in ("topv", "fastv")]
                         + [("vision", "topv"), ("vision/compact", "topv")])
def test_llava_flash_matches_reference(emulated_flash, kv, method):
    """Batched with padding; FastV's one eager layer gets an additive mask built from the 2-D one;
    the vision stage prunes before layer 0, so every layer runs the pruned sequence under flash."""
    cfg = tm.llava_config(text_layers=4)
    model = tm.build(cfg, seed=21)
    inp = tm.llava_inputs(cfg, [[5, "img", 7], [3, "img", 2, "img", 4]], seed=21)
    with torch.no_grad():
        sdpa = model(**inp).logits
    _flash(model)
    assert model.model.language_model.config._attn_implementation == "flash_attention_2"
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, sdpa, atol=1e-4, rtol=1e-4)  # the stand-ins are exact
    check_against_reference(model, inp, keep_ratio=0.3, method=method, max_new_tokens=4, **PLACEMENTS[kv])


@pytest.mark.parametrize("kv", ["after_k", "vision"])
def test_qwen2_vl_flash_batch1_gapped_mrope_positions(emulated_flash, kv):
    """Batch 1 without padding: transformers passes FlashAttention no mask, so gapped M-RoPE
    positions would be read as packed sequences if TopV let them through."""
    cfg = tm.qwen2_vl_config(text_layers=4)
    model = _flash(tm.build(cfg, seed=22))
    inp = tm.qwen2_vl_inputs(cfg, [[3, ("img", (3, 4)), 5]], seed=22)
    check_against_reference(model, inp, keep_ratio=0.25, max_new_tokens=4, **PLACEMENTS[kv])
