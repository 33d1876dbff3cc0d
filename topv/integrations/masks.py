"""Attention masks in the format each attention implementation expects, and sequence gathers."""

from __future__ import annotations

import torch


def is_flash(impl: str) -> bool:
    return "flash" in impl


def build_mask(valid: torch.Tensor, q: int, impl: str, dtype: torch.dtype):
    """Mask for q queries that are the last q of ``valid.shape[1]`` keys.

    ``valid`` bool (B, kv): key validity. Query i may see key j iff j is valid and j <= its own
    slot; it always sees itself, so a padding query never has an empty row (an empty row is NaN
    under SDPA, and a NaN value leaks through zero attention weights). FlashAttention takes the 2-D
    padding mask itself (transformers unpads with it); SDPA a boolean 4-D mask; eager an additive
    float 4-D mask."""
    if is_flash(impl):
        return valid.to(torch.int32)
    kv = valid.shape[1]
    qpos = torch.arange(kv - q, kv, device=valid.device)[:, None]
    kpos = torch.arange(kv, device=valid.device)[None, :]
    allowed = ((valid[:, None, :] & (kpos <= qpos)[None]) | (kpos == qpos)[None])[:, None]  # (B, 1, q, kv)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def gather_seq(t: torch.Tensor, index: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Gather ``t`` (..., B or 1, T, d) along its sequence dim (-2) with ``index`` (B, L);
    ``flat_index`` is ``index`` plus each row's offset ``b * T``. Rows of a (B or 1, T, d) tensor
    are copied with ``index_select`` (whole rows: much faster than ``gather`` on CPU, as fast on GPU)."""
    B, L = index.shape
    if t.dim() == 3 and t.shape[0] in (1, B):
        shared = t.shape[0] == 1 or t.stride(0) == 0  # one row of positions for the whole batch
        rows = (t[:1] if shared else t).reshape(-1, t.shape[-1])
        return rows.index_select(0, (index if shared else flat_index).reshape(-1)).view(B, L, t.shape[-1])
    shape = list(t.shape)
    shape[-3] = B
    t = t.expand(shape)
    idx = index.view(*([1] * (t.dim() - 3)), B, L, 1).expand(*shape[:-2], L, shape[-1])
    return t.gather(-2, idx)


def gather_positions(pid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``position_ids`` (..., B or 1, T) along T with ``index`` (B, L)."""
    B, L = index.shape
    pid = pid.expand(*pid.shape[:-2], B, pid.shape[-1])
    return pid.gather(-1, index.expand(*pid.shape[:-2], B, L))
