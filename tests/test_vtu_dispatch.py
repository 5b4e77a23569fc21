"""Which VTU kernel runs: the dispatch table says it, and a real model's calls follow it (prefill and decode)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_vtu import HIDDEN, make_model  # noqa: E402  (tests/ is on the path, as for encoder_zoo)

import dymu.vtu.integration as integration  # noqa: E402
from dymu.vtu import (  # noqa: E402
    DISPATCH,
    KERNELS,
    concat_groups,
    disable_vtu,
    enable_vtu,
    prepare_vtu,
    select_kernel,
    vtu_generate,
    vtu_kernels,
)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
#: What docs/vtu.md ("Which kernel runs") promises: (mode, phase, device, dtype, dropout) -> kernel.
EXPECTED = [
    ("fast", "prefill", "cpu", F32, 0.0, "fast_blocked_cpu"),
    ("fast", "prefill", "cpu", F64, 0.0, "fast_blocked_cpu"),
    ("fast", "prefill", "cpu", BF16, 0.0, "fast_sdpa"),
    ("fast", "prefill", "cpu", F32, 0.1, "fast_sdpa"),
    ("fast", "prefill", "cuda", F32, 0.0, "fast_sdpa"),
    ("fast", "prefill", "cuda", F16, 0.0, "fast_sdpa"),
    ("fast", "decode", "cpu", F32, 0.0, "exact"),
    ("fast", "decode", "cpu", BF16, 0.0, "exact"),
    ("fast", "decode", "cuda", F16, 0.0, "exact"),
    ("fast", "decode", "cuda", F32, 0.0, "exact"),
    ("exact", "prefill", "cpu", F32, 0.0, "exact"),
    ("exact", "prefill", "cpu", BF16, 0.0, "exact"),
    ("exact", "prefill", "cuda", F32, 0.0, "exact"),
    ("exact", "prefill", "cuda", F16, 0.0, "exact"),
    ("exact", "decode", "cpu", F32, 0.0, "exact"),
    ("exact", "decode", "cpu", BF16, 0.0, "exact"),
    ("exact", "decode", "cuda", F32, 0.0, "exact"),
    ("exact", "decode", "cuda", F16, 0.0, "exact"),
]


def documented(mode: str, phase: str, device: str, dtype: torch.dtype) -> str:
    """The kernel :data:`EXPECTED` names for a call without dropout."""
    return next(k for m, p, d, t, drop, k in EXPECTED if (m, p, d, t, drop) == (mode, phase, device, dtype, 0.0))


@pytest.mark.parametrize("mode, phase, device, dtype, dropout, kernel", EXPECTED,
                         ids=[f"{m}-{p}-{d}-{str(t)[6:]}-dropout{x}" for m, p, d, t, x, _ in EXPECTED])
def test_table_picks_the_documented_kernel(mode, phase, device, dtype, dropout, kernel):
    assert select_kernel(mode, phase, device, dtype, dropout) == kernel


def test_table_rows_are_all_reachable_and_name_real_kernels():
    """Every row of DISPATCH is the first match of some documented case (no dead or shadowed row)."""
    used = set()
    for mode, phase, device, dtype, dropout, kernel in EXPECTED:
        for i, (m, p, where, k) in enumerate(DISPATCH):
            if m == mode and p == phase and integration.WHERE[where](device, dtype, dropout):
                used.add(i)
                break
    assert used == set(range(len(DISPATCH)))
    assert {k for *_, k in DISPATCH} <= set(KERNELS)


def test_override_forces_one_phase_only_and_checks_names():
    with vtu_kernels(prefill="fast_sdpa"):
        assert select_kernel("fast", "prefill", "cpu", F32) == "fast_sdpa"
        assert select_kernel("exact", "prefill", "cpu", F32) == "fast_sdpa"  # every mode
        assert select_kernel("fast", "decode", "cpu", F32) == "exact"
        with vtu_kernels(decode="fast_blocked_cpu"):  # nested: both
            assert select_kernel("fast", "decode", "cpu", F32) == "fast_blocked_cpu"
            assert select_kernel("fast", "prefill", "cpu", F32) == "fast_sdpa"
        assert select_kernel("fast", "decode", "cpu", F32) == "exact"
    assert select_kernel("fast", "prefill", "cpu", F32) == "fast_blocked_cpu"
    with pytest.raises(ValueError, match="decode must be one of 'fast_sdpa', 'fast_blocked_cpu', 'exact'; got 'fast'"):
        with vtu_kernels(decode="fast"):
            pass


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_model_calls_run_the_tables_kernel(device, monkeypatch):
    """generate on a real decoder: each attention call runs the documented kernel for its mode, its phase (told
    apart here by the call's shapes: the prefill attends its own columns, a decode step a longer cache), device and
    dtype; a decode override changes the decode steps only."""
    calls: list[tuple[str, str]] = []
    for name, fn in KERNELS.items():
        def spy(query, key, *args, _name=name, _fn=fn):
            calls.append(("prefill" if query.shape[2] == key.shape[2] else "decode", _name))
            return _fn(query, key, *args)
        monkeypatch.setitem(integration.KERNELS, name, spy)
    model = make_model("llama").to(device)
    gen = torch.Generator().manual_seed(1)
    groups = [concat_groups([2, torch.tensor([0, 1, 0, 2, 2, 1, 0]), 3]),
              concat_groups([1, torch.tensor([0, 0, 1]), 2])]
    batch = prepare_vtu([g.to(device) for g in groups])
    embeds = [torch.randn(int(g.max()) + 1, HIDDEN, generator=gen) for g in groups]
    layers = model.config.num_hidden_layers
    dtypes = [F32] + ([F16] if device == "cuda" else [BF16])
    for dtype in dtypes:
        model.to(dtype)
        for mode in ("fast", "exact"):
            for forced in (None, "fast_sdpa"):
                enable_vtu(model, mode)
                calls.clear()
                with torch.no_grad(), vtu_kernels(decode=forced):
                    vtu_generate(model, batch, inputs_embeds=batch.pad(embeds).to(device, dtype), max_new_tokens=3,
                                 do_sample=False)
                want = [("prefill", documented(mode, "prefill", device, dtype))] * layers
                want += [("decode", forced or documented(mode, "decode", device, dtype))] * (2 * layers)
                assert calls == want, (device, dtype, mode, forced)
    disable_vtu(model)
