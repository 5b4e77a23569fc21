"""dymu's own small ops (DToMe steps, VTU attention kernels) run on dymu.threads.SMALL_OP_THREADS CPU threads, the
model's ops on torch's setting, which is restored afterwards (issue 29: DyMU lost to full tokens on a busy machine
at torch's default threads)."""

from __future__ import annotations

import pytest
import torch

import dymu.merge
import dymu.threads
from dymu.merge import TokenState, dtome_step


@pytest.fixture()
def two_threads(request):
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(2)


def spy(monkeypatch, where, name: str) -> list[int]:
    """Record torch's thread count at every call of ``where.name`` (a module attribute or a dict entry, looked up
    at call time)."""
    seen: list[int] = []
    original = where[name] if isinstance(where, dict) else getattr(where, name)

    def wrapper(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    if isinstance(where, dict):
        monkeypatch.setitem(where, name, wrapper)
    else:
        monkeypatch.setattr(where, name, wrapper)
    return seen


def test_dtome_step_runs_on_one_thread_and_restores_torchs(two_threads, monkeypatch):
    seen = spy(monkeypatch, dymu.merge, "merge_tokens")
    x = torch.randn(2, 9, 4)
    out, _ = dtome_step(TokenState.init(x), x, mode="infer", protect_first=True, threshold=-1.0)
    assert seen == [1] and out.num_tokens.tolist() == [5, 5]
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(dymu.threads, "SMALL_OP_THREADS", None)  # torch's setting, untouched
    dtome_step(TokenState.init(x), x, mode="infer", protect_first=True, threshold=-1.0)
    assert seen == [1, 2]


def test_an_error_inside_restores_torchs_threads(two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with dymu.threads.small_ops(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_vtu_kernels_run_on_one_thread_the_model_on_torchs(two_threads, monkeypatch):
    """Prefill (fast kernel) and decode steps (exact kernel) inside VTU's attention function; the decoder's linear
    layers outside it."""
    from transformers import LlamaForCausalLM

    import dymu.vtu.integration as integration
    from dymu.testing import scale_weights, tiny_llama_config
    from dymu.vtu import concat_groups, enable_vtu, prepare_vtu, vtu_generate

    model = scale_weights(LlamaForCausalLM(tiny_llama_config()).eval())
    seen = {name: spy(monkeypatch, integration.KERNELS, name) for name in ("fast_blocked_cpu", "exact")}
    linear = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *_: linear.append(torch.get_num_threads()))
    enable_vtu(model, "fast")
    batch = prepare_vtu([concat_groups([2, torch.tensor([0, 0, 1, 2, 1, 2]), 3])])
    embeds = torch.randn(1, 8, 64)
    with torch.no_grad():
        vtu_generate(model, batch, inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen["fast_blocked_cpu"] and set(seen["fast_blocked_cpu"]) == {1}  # prefill
    assert seen["exact"] and set(seen["exact"]) == {1}  # decode steps
    assert set(linear) == {2} and torch.get_num_threads() == 2
