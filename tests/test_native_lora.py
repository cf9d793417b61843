"""The fused C multi-LoRA kernel (engine/vllm_backend/csrc/lora_cpu.c via engine.vllm_backend.native_lora) against the definition."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.vllm_backend import native_lora
from prag.errors import PragError

# blocks of 4 equal slots (the kernel's shared-weights path), single tokens, no adapter (-1), a slot past
# the stacked tensor (treated as no adapter), a run that straddles a block boundary, a short tail
SLOTS = [2, 2, 2, 2, 0, 1, 1, -1, 3, 3, 3, 3, 3, 3, 3, 3, 5, 9, 2, 4, 4]


@pytest.fixture(scope="module")
def kernel() -> native_lora.NativeLoRA:
    k = native_lora.load()
    assert k is not None, "the C kernel did not build: is there a C compiler (cc/gcc)?"
    return k


def _weights(n_slots: int, rank: int, d_in: int, widths: list[int], dtype, seed: int, live_rank: int):
    """vLLM-style stacked A ``[L, r, in]`` and B ``[L, out, r]`` per slice; rows past ``live_rank`` are zero, as
    in vLLM's slots padded to max_lora_rank. Slot 1 is all zero (an empty slot)."""
    g = torch.Generator().manual_seed(seed)
    a_list, b_list = [], []
    for w in widths:
        a = torch.zeros(n_slots, rank, d_in)
        b = torch.zeros(n_slots, w, rank)
        a[:, :live_rank] = torch.randn(n_slots, live_rank, d_in, generator=g)
        b[:, :, :live_rank] = torch.randn(n_slots, w, live_rank, generator=g)
        a[1], b[1] = 0, 0
        a_list.append(a.to(dtype))
        b_list.append(b.to(dtype))
    return a_list, b_list


def _definition(y0, x, slots, a_list, b_list, offsets, widths, scale, n_slots):
    """Token by token in float64: y[t, slice k] += (scale * x[t] @ A_k[s].T) @ B_k[s].T."""
    y = y0.double().clone()
    for t, s in enumerate(slots):
        if 0 <= s < n_slots:
            for a, b, off, w in zip(a_list, b_list, offsets, widths, strict=True):
                h = scale * (a[s].double() @ x[t].double())
                y[t, off:off + w] += b[s].double() @ h
    return y


def _run(kernel, y, x, slots, a_list, b_list, offsets, widths, scale):
    bts = [b.transpose(1, 2).contiguous() for b in b_list]
    kernel.linear(y, x, torch.tensor(slots, dtype=torch.long), a_list, bts, offsets, widths, scale)


# widths and d_in that are and are not multiples of the kernel's 16-float vectors
@pytest.mark.parametrize("d_in,widths", [(64, [48, 80]), (37, [21]), (16, [16, 16, 5])])
def test_float32_matches_the_definition(kernel, d_in, widths):
    n_slots, rank = 6, 8
    a_list, b_list = _weights(n_slots, rank, d_in, widths, torch.float32, seed=d_in, live_rank=6)
    g = torch.Generator().manual_seed(1)
    x_wide = torch.randn(len(SLOTS), d_in + 3, generator=g)
    x = x_wide[:, 1:d_in + 1]  # a row stride that is not the width
    offsets = [3 + sum(widths[:k]) for k in range(len(widths))]
    y0 = torch.randn(len(SLOTS), 3 + sum(widths) + 4, generator=g)
    y = y0.clone()
    _run(kernel, y, x, SLOTS, a_list, b_list, offsets, widths, scale=0.5)
    want = _definition(y0, x, SLOTS, a_list, b_list, offsets, widths, 0.5, n_slots)
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(y[:, :3], y0[:, :3]) and torch.equal(y[:, -4:], y0[:, -4:])  # outside the slices
    untouched = [t for t, s in enumerate(SLOTS) if s < 0 or s >= n_slots or s == 1]
    assert torch.equal(y[untouched], y0[untouched])


def test_bfloat16_rounds_once_from_the_float32_sum(kernel):
    """bf16 activations and weights: products and sums in fp32 (vLLM's fp32 buffer), y rounded once."""
    n_slots, widths = 6, [96, 40]
    a_list, b_list = _weights(n_slots, 8, 64, widths, torch.bfloat16, seed=3, live_rank=6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(len(SLOTS), 64, generator=g).to(torch.bfloat16)
    y0 = torch.randn(len(SLOTS), sum(widths), generator=g).to(torch.bfloat16)
    y = y0.clone()
    _run(kernel, y, x, SLOTS, a_list, b_list, [0, 96], widths, scale=1.0)
    want = _definition(y0, x, SLOTS, a_list, b_list, [0, 96], widths, 1.0, n_slots)
    # the exact sum rounded to bf16 is within half an ulp; fp32 accumulation order can move it one ulp
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1.0)
    assert ((y.double() - want).abs() <= ulp).all()
    assert (y.double() == want.to(torch.bfloat16).double()).float().mean() > 0.95


def test_bfloat16_store_rounds_like_torch(kernel):
    """y = 0 + 1 * v: the kernel's fp32 -> bf16 store against torch's cast, bit for bit, on ties, huge values,
    infinities and NaN."""
    base = torch.tensor([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.4e38, -3.4e38, float("inf"),
                         float("-inf"), float("nan"), 1e-40, 0.0])  # not -0.0: 0 + -0 is +0, as in torch
    v = torch.cat([base, torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 100]).reshape(1, -1)
    width = v.shape[1]
    x = torch.ones(1, 1)
    a = torch.ones(1, 1, 1)  # h = 1
    y = torch.zeros(1, width, dtype=torch.bfloat16)
    kernel.linear(y, x, torch.zeros(1, dtype=torch.long), [a], [v.reshape(1, 1, width)], [0], [width], 1.0)
    want = v.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_rejects_what_it_cannot_take(kernel):
    a_list, b_list = _weights(2, 4, 8, [8], torch.float32, seed=6, live_rank=4)
    bts = [b.transpose(1, 2).contiguous() for b in b_list]
    slots = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="x: needs a CPU float32/bfloat16"):
        kernel.linear(torch.zeros(3, 8), torch.zeros(3, 8, dtype=torch.float16), slots, a_list, bts, [0], [8], 1.0)
    with pytest.raises(ValueError, match="slots"):
        kernel.linear(torch.zeros(3, 8), torch.zeros(3, 8), slots.int(), a_list, bts, [0], [8], 1.0)
    with pytest.raises(ValueError, match="one entry per slice"):
        kernel.linear(torch.zeros(3, 8), torch.zeros(3, 8), slots, a_list, bts, [0, 8], [8], 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        kernel.linear(torch.zeros(3, 8), torch.zeros(3, 8), slots, a_list, [bts[0].bfloat16()], [0], [8], 1.0)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    cc = native_lora._compiler()
    assert cc is not None
    first = native_lora.build(cc, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native_lora.build(cc, tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind
    with pytest.raises(RuntimeError, match="failed on"):
        native_lora.build("false", tmp_path / "broken")
    assert not any((tmp_path / "broken").iterdir())


def test_switch_off_and_missing_compiler_fall_back(monkeypatch):
    monkeypatch.setenv(native_lora.ENV_FLAG, "0")
    assert native_lora._try_load() is None
    monkeypatch.delenv(native_lora.ENV_FLAG)
    monkeypatch.setattr(native_lora, "_compiler", lambda: None)
    assert native_lora._try_load() is None


def test_wrapper_refreshes_transposed_b_after_an_in_place_adapter_load():
    """vLLM writes a new adapter into a slot in place; the cached transposed B must follow."""
    from engine.vllm_backend.cpu_lora import GroupedPunicaWrapperCPU

    wrapper = SimpleNamespace(_transposed={}, _native=native_lora.load())
    lora_b = torch.randn(3, 1, 10, 4)
    lora_b[1, 0, :, 3] = 0  # slot 1: rank 3 padded to 4
    first = GroupedPunicaWrapperCPU._lora_bt(wrapper, lora_b)
    assert torch.equal(first, lora_b[:, 0].transpose(1, 2))
    assert wrapper._transposed[id(lora_b)][3].tolist() == [4, 3, 4]  # live ranks
    assert GroupedPunicaWrapperCPU._lora_bt(wrapper, lora_b) is first  # cached
    lora_b[2, 0, :, :2].copy_(torch.ones(10, 2))  # vLLM's set_lora
    lora_b[2, 0, :, 2:] = 0
    again = GroupedPunicaWrapperCPU._lora_bt(wrapper, lora_b)
    assert again is not first and torch.equal(again, lora_b[:, 0].transpose(1, 2))
    assert wrapper._transposed[id(lora_b)][3].tolist() == [4, 3, 2]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRAG_CACHE_DIR", str(tmp_path))
    assert native_lora.cache_dir() == tmp_path / "native"
    monkeypatch.delenv("PRAG_CACHE_DIR")
    assert native_lora.cache_dir() == Path.home() / ".cache" / "prag-engine" / "native"


def test_same_bits_with_any_thread_count(kernel):
    """Tokens are independent, so splitting them over threads (torch's count is passed) changes nothing."""
    a_list, b_list = _weights(6, 8, 64, [96], torch.bfloat16, seed=9, live_rank=6)
    slots = [s % 6 for s in range(0, 600, 7)] + [3] * 400  # decode-like, then a long prefill run
    g = torch.Generator().manual_seed(10)
    x = torch.randn(len(slots), 64, generator=g).to(torch.bfloat16)
    y0 = torch.randn(len(slots), 96, generator=g).to(torch.bfloat16)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = y0.clone()
            _run(kernel, y, x, slots, a_list, b_list, [0], [96], scale=2.0)
            outs.append(y)
    finally:
        torch.set_num_threads(before)
    assert not torch.equal(outs[0], y0)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("d_in,live_rank", [(37, 1), (80, 2), (64, 3), (100, 5), (33, 8)])
def test_bfloat16_live_ranks_and_tails_match_the_definition(kernel, d_in, live_rank):
    """bf16 takes the VDPBF16PS shrink where the CPU has it: inputs not a multiple of its 32-element chunks
    (masked tails), live ranks that leave 1-3 rows after the 4-row passes, one adapter per token (the decode
    path, which prefetches the next token's rows) and blocks of one adapter (prefill); the kernel told each
    slot's live rank gives the same bits as without it."""
    n_slots, widths = 7, [50, 33]
    a_list, b_list = _weights(n_slots, 8, d_in, widths, torch.bfloat16, seed=d_in, live_rank=live_rank)
    slots = [s % n_slots for s in range(40)] + [4] * 9 + [-1, 6, 6, 6, 6, 0]
    g = torch.Generator().manual_seed(d_in + 1)
    x = torch.randn(len(slots), d_in, generator=g).to(torch.bfloat16)
    y0 = torch.randn(len(slots), sum(widths), generator=g).to(torch.bfloat16)
    offsets = [0, widths[0]]
    bts = [b.transpose(1, 2).contiguous() for b in b_list]
    live = [kernel.live_ranks(bt, torch.empty(n_slots, dtype=torch.long)) for bt in bts]
    assert all(lv.tolist() == [live_rank, 0] + [live_rank] * (n_slots - 2) for lv in live)  # slot 1 is empty
    s = torch.tensor(slots, dtype=torch.long)
    y, y_live = y0.clone(), y0.clone()
    kernel.linear(y, x, s, a_list, bts, offsets, widths, 0.75)
    kernel.linear(y_live, x, s, a_list, bts, offsets, widths, 0.75, live)
    assert torch.equal(y, y_live)
    want = _definition(y0, x, slots, a_list, b_list, offsets, widths, 0.75, n_slots)
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1.0)
    assert ((y.double() - want).abs() <= ulp).all()


def test_float32_with_live_ranks_is_bit_identical(kernel):
    """The fp32 path (the token-identity tests' dtype) skips dead rows without changing a bit."""
    n_slots, widths = 6, [48, 80]
    a_list, b_list = _weights(n_slots, 8, 64, widths, torch.float32, seed=11, live_rank=6)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(len(SLOTS), 64, generator=g)
    y0 = torch.randn(len(SLOTS), sum(widths), generator=g)
    bts = [b.transpose(1, 2).contiguous() for b in b_list]
    live = [kernel.live_ranks(bt, torch.empty(n_slots, dtype=torch.long)) for bt in bts]
    y, y_live = y0.clone(), y0.clone()
    kernel.linear(y, x, torch.tensor(SLOTS), a_list, bts, [0, 48], widths, 0.5)
    kernel.linear(y_live, x, torch.tensor(SLOTS), a_list, bts, [0, 48], widths, 0.5, live)
    assert torch.equal(y, y_live) and not torch.equal(y, y0)


def test_live_ranks_read_bits_not_values(kernel):
    bt = torch.zeros(4, 5, 9)
    bt[0, 4, 8] = 1.0  # last row live
    bt[2, 1, 0] = -0.0  # a -0.0 is not padding
    bt[3, :3] = torch.randn(3, 9)
    got = kernel.live_ranks(bt, torch.empty(4, dtype=torch.long)).tolist()
    assert got == [5, 0, 2, 3]
    assert kernel.live_ranks(bt.bfloat16(), torch.empty(4, dtype=torch.long)).tolist() == got
    with pytest.raises(ValueError, match="one entry per slot"):
        kernel.live_ranks(bt, torch.empty(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fill_slot_writes_what_torch_copies_write(dtype):
    """The memory hand-over's one-call slot fill: stacked A and B as torch's copies write them, and the
    kernel's transposed B and live ranks kept in step (no rebuild on the next step)."""
    from engine.vllm_backend.cpu_lora import GroupedPunicaWrapperCPU

    wrapper = GroupedPunicaWrapperCPU.__new__(GroupedPunicaWrapperCPU)  # no vLLM state needed here
    wrapper._transposed, wrapper._native, wrapper._fill_layouts = {}, native_lora.load(), {}
    g = torch.Generator().manual_seed(13)
    shapes = [(24, 40), (40, 24), (17, 9)]  # (in, out)
    targets = [(torch.randn(5, 1, 8, i, generator=g).to(dtype), torch.randn(5, 1, o, 8, generator=g).to(dtype))
               for i, o in shapes]
    for _, b_st in targets[:2]:  # the third has no transposed copy yet: the next step builds it
        GroupedPunicaWrapperCPU._lora_bt(wrapper, b_st)
    views = []
    for i, o in shapes:
        a, b = torch.randn(8, i, generator=g).to(dtype), torch.randn(o, 8, generator=g).to(dtype)
        a[5:], b[:, 5:] = 0, 0  # rank 5 padded to 8
        views.append((a, b))
    want = [(a_st.clone(), b_st.clone()) for a_st, b_st in targets]
    for (a_st, b_st), (a, b) in zip(want, views):
        a_st[3, 0].copy_(a)
        b_st[3, 0].copy_(b)
    assert GroupedPunicaWrapperCPU.fill_slot(wrapper, 3, targets, views)
    for (a_st, b_st), (wa, wb) in zip(targets, want):
        assert torch.equal(a_st, wa) and torch.equal(b_st, wb)
    for _, b_st in targets[:2]:
        bt = GroupedPunicaWrapperCPU._lora_bt(wrapper, b_st)  # still the cached copy, now up to date
        assert torch.equal(bt, b_st[:, 0].transpose(1, 2))
        assert wrapper._transposed[id(b_st)][3][3].item() == 5
    assert id(targets[2][1]) not in wrapper._transposed
    # anything it cannot take is left to the torch copies, untouched
    assert not GroupedPunicaWrapperCPU.fill_slot(wrapper, 3, targets, [(a.float(), b) for a, b in views]
                                                 if dtype != torch.float32 else [(a.double(), b) for a, b in views])
    assert not GroupedPunicaWrapperCPU.fill_slot(wrapper, 5, targets, views)  # no slot 5
    for (a_st, b_st), (wa, wb) in zip(targets, want):
        assert torch.equal(a_st, wa) and torch.equal(b_st, wb)


@pytest.mark.parametrize("out_dtype,row_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
def test_slot_merge_c_pass_equals_the_torch_ops(kernel, out_dtype, row_dtype):
    """memory_lora.SlotMerge's C pass: the same bits as its gather, multiply and cast in torch."""
    from engine.vllm_backend.memory_lora import Segment, SlotMerge, SlotPlan
    from prag.store import Layout

    keys, shapes, segments = [], [], []
    for m, (d_in, d_out) in {"l0.gate": (20, 36), "l0.down": (36, 20), "l1.gate": (20, 36)}.items():
        keys += [f"{m}.lora_A", f"{m}.lora_B"]
        shapes += [(2, d_in), (d_out, 2)]
        segments.append(Segment(m, 0, m, (8, d_in), (d_out, 8)))
    layout = Layout(tuple(keys), tuple(shapes))
    plan = SlotPlan(segments, 8, out_dtype)
    rows = (torch.randn(3, layout.params_per_doc, generator=torch.Generator().manual_seed(14)) * 3).to(row_dtype)
    rows[0, :5] = torch.tensor([1e-40, -0.0, 3.0e38, 1.0 + 2**-8, -(1.0 + 3 * 2**-8)])  # denormal, ties
    c_merge, t_merge = SlotMerge(layout, 3, 16.0, plan), SlotMerge(layout, 3, 16.0, plan)
    assert c_merge._native is not None
    t_merge._native = None
    got, want = c_merge(rows), t_merge(rows)
    assert got.flat.dtype == want.flat.dtype == out_dtype
    bits = torch.int16 if out_dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.flat.view(bits), want.flat.view(bits))
    with pytest.raises(PragError, match="exceed vLLM's max_lora_rank"):
        SlotMerge(layout, 5, 16.0, plan)
