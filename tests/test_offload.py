"""Activation offload (standby/offload.py): the pack/unpack path keeps gradients exact, never
touches parameters, and works with a reentrant-checkpointed Hugging Face model under peft."""

import pytest
import torch

from compilepass.standby.training.offload import ActivationOffload


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def test_forced_offload_gives_identical_gradients_and_skips_parameters():
    model = _mlp()
    x = torch.randn(32, 64, requires_grad=True)
    model(x).square().sum().backward()
    ref, ref_x = _grads(model), x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None

    hooks = ActivationOffload(model.parameters(), min_bytes=0, force=True, device=torch.device("cpu"))
    with hooks:
        loss = model(x).square().sum()
    # the input, the hidden activations and the GELU output are offloaded; the weights are not
    assert hooks.stats.offloaded_tensors >= 3
    assert hooks.stats.kept_tensors >= 2
    loss.backward()
    assert hooks.stats.restored_tensors == hooks.stats.offloaded_tensors
    got = _grads(model)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(x.grad, ref_x, rtol=0, atol=0)


def test_min_bytes_keeps_small_tensors():
    model = _mlp()
    x = torch.randn(2, 64, requires_grad=True)
    hooks = ActivationOffload(model.parameters(), min_bytes=1 << 30, force=True, device=torch.device("cpu"))
    with hooks:
        model(x).sum().backward()
    assert hooks.stats.offloaded_tensors == 0 and hooks.stats.kept_tensors > 0


def test_inactive_without_cuda_unless_forced():
    hooks = ActivationOffload([], device=torch.device("cpu"))
    assert hooks.active is False
    x = torch.randn(1024, 1024, requires_grad=True)
    with hooks:
        (x * x).sum().backward()
    assert hooks.stats.offloaded_tensors == 0


def test_reentrant_checkpointed_peft_model_with_offload_matches():
    """policy_logprobs through a LoRA model with reentrant checkpointing: the checkpointed layers'
    inputs go through the hooks, and the LoRA gradients equal those without offload."""
    from compilepass.core.models import add_lora, build_model
    from compilepass.standby.training.checkpointing import enable_checkpointing
    from compilepass.standby.training.logprobs import policy_logprobs

    model = add_lora(build_model("tiny-llama", dtype=torch.float32), rank=4, alpha=8, init_random=True)
    causal_lm = model.get_base_model()
    enable_checkpointing(causal_lm, reentrant=True)
    model.train()
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids = torch.tensor([[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

    def run(offload):
        model.zero_grad(set_to_none=True)
        if offload:
            hooks = ActivationOffload(model.parameters(), min_bytes=0, force=True, device=torch.device("cpu"))
            with hooks:
                logp = policy_logprobs(model, prompts, ids, mask)
        else:
            hooks, logp = None, policy_logprobs(model, prompts, ids, mask)
        logp.sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, hooks

    ref_lp, ref_g, _ = run(False)
    lp, g, hooks = run(True)
    n_layers = causal_lm.config.num_hidden_layers
    assert hooks.stats.offloaded_tensors >= n_layers  # at least each checkpointed layer's input
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=0)
    assert g.keys() == ref_g.keys() and any("lora_B" in n for n in g)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: measures device memory freed by offload")
def test_cuda_offload_frees_device_memory():
    dev = torch.device("cuda")
    layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024, device=dev) for _ in range(8))
    x = torch.randn(8192, 1024, device=dev, requires_grad=True)

    def forward():
        h = x
        for layer in layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=True)
        return h.float().square().mean()

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    loss = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated(dev) - base
    loss.backward()
    ref = x.grad.clone()
    x.grad = None
    del loss
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    with ActivationOffload(layers.parameters(), device=dev):
        loss = forward()
    torch.cuda.synchronize()
    offloaded = torch.cuda.memory_allocated(dev) - base
    loss.backward()
    assert offloaded < kept / 2
    torch.testing.assert_close(x.grad, ref)
