"""Cat-merge of per-document adapters: the maths, and equality with PEFT's own cat merge."""

from __future__ import annotations

import pytest
import torch

from engine.merge import RowMerge, cat_merge, delta_weight
from prag.errors import PragError

MODULES = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
SHAPES = {"gate_proj": (128, 256), "down_proj": (256, 128)}  # (in, out)


def _adapter(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        fan_in, fan_out = SHAPES[m.rsplit(".", 1)[1]]
        out[f"{m}.lora_A"] = torch.randn(rank, fan_in, generator=g)
        out[f"{m}.lora_B"] = torch.randn(fan_out, rank, generator=g)
    return out


def test_merged_delta_is_the_sum_of_scaled_deltas():
    adapters = [_adapter(s) for s in (1, 2, 3)]
    merged = cat_merge(adapters, alpha=32)
    assert merged.rank == 6 and merged.alpha == 6
    for m in MODULES:
        assert merged.tensors[f"{m}.lora_A"].shape[0] == 6
        assert merged.tensors[f"{m}.lora_B"].shape[1] == 6
        want = sum(delta_weight(a, m, scaling=32 / 2) for a in adapters)
        got = delta_weight(merged.tensors, m, scaling=merged.alpha / merged.rank)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_mixed_ranks_and_per_adapter_alpha():
    adapters = [_adapter(1, rank=2), _adapter(2, rank=4)]
    merged = cat_merge(adapters, alpha=[32, 8])
    assert merged.rank == 6
    want = delta_weight(adapters[0], MODULES[0], 16) + delta_weight(adapters[1], MODULES[0], 2)
    torch.testing.assert_close(delta_weight(merged.tensors, MODULES[0]), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k, alpha, storage", [(3, 32, torch.float32), (1, 7, torch.float32),
                                               (2, [5, 11], torch.bfloat16)])
def test_row_merge_is_bit_identical_to_cat_merge(k, alpha, storage):
    """The engine's one-gather merge of flat store rows against the per-tensor definition."""
    from prag.store import Layout

    adapters = [_adapter(s, rank=3) for s in range(10, 10 + k)]
    layout = Layout.from_adapter(adapters[0])
    rows = layout.flatten(adapters, storage)
    got = RowMerge(layout, k, alpha)(rows)
    want = cat_merge([layout.unflatten(r) for r in rows], alpha)
    assert list(got.tensors) == list(want.tensors) and got.rank == want.rank == 3 * k
    for key, tensor in want.tensors.items():
        assert got.tensors[key].dtype == torch.float32 and torch.equal(got.tensors[key], tensor), key


def test_row_merge_rejects_rows_of_the_wrong_shape():
    from prag.store import Layout

    layout = Layout.from_adapter(_adapter(1))
    merge = RowMerge(layout, 2, 32)
    with pytest.raises(PragError, match=r"expects rows of shape \(2, "):
        merge(torch.zeros(3, layout.params_per_doc))
    with pytest.raises(PragError, match="2 alpha values for k=3"):
        RowMerge(layout, 3, [1, 2])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(PragError, match="at least one"):
        cat_merge([], alpha=32)
    a, b = _adapter(1), _adapter(2)
    del b[f"{MODULES[1]}.lora_A"], b[f"{MODULES[1]}.lora_B"]
    with pytest.raises(PragError, match="different modules"):
        cat_merge([a, b], alpha=32)
    c = _adapter(3)
    c[f"{MODULES[0]}.lora_B"] = torch.zeros(256, 3)
    with pytest.raises(PragError, match="not \\[r, in\\] and \\[out, r\\]"):
        cat_merge([a, c], alpha=32)
    with pytest.raises(PragError, match="2 alpha values for 3"):
        cat_merge([a, a, a], alpha=[1, 2])


def test_equals_peft_add_weighted_adapter_cat(tmp_path, tiny_model_dir):
    """Same tensors as PEFT's add_weighted_adapter(weights=[1]*k, combination_type='cat')."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from offline_encode.peft_format import write_peft_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    targets = ["gate_proj", "up_proj", "down_proj"]
    # per-document adapters: PEFT's own layout, randomised with a seeded generator
    skeleton = get_peft_model(base, LoraConfig(r=2, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    names = [n for n, mod in skeleton.base_model.model.named_modules() if hasattr(mod, "lora_A")]
    base = skeleton.unload()
    adapters = []
    for seed in (11, 12, 13):
        g = torch.Generator().manual_seed(seed)
        mods = dict(base.named_modules())
        ad = {}
        for n in names:
            lin = mods[n]
            ad[f"{n}.lora_A"] = torch.randn(2, lin.in_features, generator=g) * 0.1
            ad[f"{n}.lora_B"] = torch.randn(lin.out_features, 2, generator=g) * 0.1
        adapters.append(ad)
    for i, ad in enumerate(adapters):
        write_peft_adapter(ad, tmp_path / f"a{i}", rank=2, alpha=32, target_modules=targets)
    pm = PeftModel.from_pretrained(base, str(tmp_path / "a0"), adapter_name="0")
    pm.load_adapter(str(tmp_path / "a1"), adapter_name="1")
    pm.load_adapter(str(tmp_path / "a2"), adapter_name="2")
    pm.add_weighted_adapter(["0", "1", "2"], [1, 1, 1], adapter_name="merge", combination_type="cat")
    assert pm.peft_config["merge"].r == 6 and pm.peft_config["merge"].lora_alpha == 6

    merged = cat_merge(adapters, alpha=32)
    wrapped = dict(pm.base_model.model.named_modules())
    assert len(names) == 6
    for n in names:
        torch.testing.assert_close(merged.tensors[f"{n}.lora_A"], wrapped[n].lora_A["merge"].weight.detach(),
                                   rtol=0, atol=0)
        torch.testing.assert_close(merged.tensors[f"{n}.lora_B"], wrapped[n].lora_B["merge"].weight.detach(),
                                   rtol=0, atol=0)
        assert wrapped[n].scaling["merge"] == 1.0
