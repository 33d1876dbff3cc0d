"""On a GPU: a pruned prefill and its decode run on SDPA's fused kernels (flash, cuDNN, memory-efficient)
alone, with the math backend switched off, and give the logits of the unrestricted run."""

import contextlib

import pytest
import torch
from conftest import requires_cuda

import topv
from topv.testing import tiny_models as tm

FUSED = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def _generate(model, inputs, restrict: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, b) for b in FUSED if hasattr(SDPBackend, b)]
    ctx = sdpa_kernel(backends) if restrict else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@requires_cuda
@pytest.mark.parametrize("prompts", [[[5, "img", 7]], [[5, "img", 7], [2, "img", 9]]], ids=["B1", "B2-left-padded"])
@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_pruned_prefill_runs_on_fused_sdpa_kernels(prompts, kv):
    config = tm.llava_config(attn="sdpa")
    model = tm.build(config, dtype=torch.bfloat16, device="cuda")
    inputs = tm.llava_inputs(config, prompts, dtype=torch.bfloat16, device="cuda")
    with topv.enable(model, keep_ratio=0.25, kv=kv, check_finite=False) as session:
        seq_fused, logits_fused = _generate(model, inputs, restrict=True)
        assert session.last is not None and session.last.pruned_length < inputs["input_ids"].shape[1]
        seq_any, logits_any = _generate(model, inputs, restrict=False)
    assert torch.equal(seq_fused, seq_any)
    torch.testing.assert_close(logits_fused.float(), logits_any.float(), atol=3e-2, rtol=3e-2)
