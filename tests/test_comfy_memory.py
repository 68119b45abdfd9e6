"""The ComfyUI host's memory savings: gradient checkpointing and row-wise feed-forwards, on the tiny SD1.5-shaped
checkpoint. They must not change the erasure, and must come off the input MODEL's shared modules afterwards.

Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402

comfy_env.require_comfyui()

RESOLUTION = 64  # 8x8 latents
# Short erasures: a few sampling passes of several rows and updates of two rows (hold_unconditional adds the empty
# prompt's row), with a learning rate high enough that the delta moves visibly.
SETTINGS = dict(concept="a cat", method="esd-x", iterations=3, lr=1e-3, sample_steps=3, trajectories=2, seed=0,
                resolution=RESOLUTION, hold_unconditional=1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from comfy_env.one_torch_thread()


@pytest.fixture(scope="module")
def env():
    return comfy_env.in_process_comfy()


@pytest.fixture(scope="module")
def comfy_model(env):
    return comfy_env.load_tiny_model()


@pytest.fixture(scope="module")
def host_module(env):
    return comfy_env.pack_module("nodes.comfy_host")


def settings(**overrides) -> dict:
    return comfy_env.pack_module("esd_core.options").defaults() | SETTINGS | overrides


def own_forwards(model) -> dict[str, object]:
    """Each module's own ``forward`` attribute (None: it has none, and runs its class's)."""
    return {name: module.__dict__.get("forward") for name, module in model.model.named_modules()}


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.model.state_dict().items()}


def assert_as_before(model, forwards: dict, tensors: dict) -> None:
    assert own_forwards(model) == forwards
    after = model.model.state_dict()
    assert set(after) == set(tensors)
    assert all(torch.equal(tensors[name], after[name].to(tensors[name].device)) for name in tensors)


def memory_patched(model, host_module) -> tuple[int, int]:
    """How many outermost UNet blocks, and how many transformer feed-forwards, run a replaced forward now."""
    blocks, feed_forwards = patchable(model, host_module)
    return sum("forward" in m.__dict__ for m in blocks), sum("forward" in m.__dict__ for m in feed_forwards)


def patchable(model, host_module) -> tuple[list, list]:
    """The outermost UNet blocks, and the transformer blocks' feed-forwards."""
    import comfy.ldm.modules.attention

    unet = model.model.diffusion_model
    transformers = [m for m in unet.modules() if isinstance(m, comfy.ldm.modules.attention.BasicTransformerBlock)]
    return host_module.outermost_blocks(unet), [block.ff for block in transformers]


def all_patched(model, host_module) -> tuple[int, int]:
    blocks, feed_forwards = patchable(model, host_module)
    assert len(blocks) > 10 and feed_forwards
    return len(blocks), len(feed_forwards)


def trained_delta(model, clip, host_module, gradient_checkpointing: bool, progress=None) -> dict[str, torch.Tensor]:
    esd = comfy_env.pack_module("esd_core.esd")
    config = comfy_env.pack_module("esd_core.config").EraseConfig.from_settings(settings())
    with torch.inference_mode(False):
        host = host_module.ComfyErasureHost(model, clip, RESOLUTION, gradient_checkpointing)
        try:
            return esd.train_erasure(host, config, progress).detached()
        finally:
            host.release()


def test_checkpointing_gives_the_same_erasure_and_training_loads_the_model_alone(comfy_model, host_module, monkeypatch):
    import comfy.model_management

    model, clip = comfy_model
    loads = []  # (models, memory_required, force_full_load) of every load_models_gpu call
    load_models_gpu = comfy.model_management.load_models_gpu

    def recorded(models, memory_required=0, force_full_load=False, **kwargs):
        loads.append((list(models), memory_required, force_full_load))
        return load_models_gpu(models, memory_required=memory_required, force_full_load=force_full_load, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recorded)
    patched, deltas = [], {}
    for gradient_checkpointing in (True, False):
        loads.clear()
        deltas[gradient_checkpointing] = trained_delta(model, clip, host_module, gradient_checkpointing,
                                                       lambda i, loss: patched.append(memory_patched(model, host_module)))
        # once the prompts are encoded (the CLIP loaded), the UNet is loaded fully and alone, every other model out
        alone = [i for i, (_, memory_required, _) in enumerate(loads) if memory_required >= 1e20]
        assert len(alone) == 1
        models, _, force_full_load = loads[alone[0]]
        assert force_full_load and len(models) == 1 and models[0].is_clone(model) and models[0] is not model
        assert any(clip.patcher in models for models, _, _ in loads[: alone[0]])
        assert all(models == [loads[alone[0]][0][0]] for models, _, _ in loads[alone[0] :])
    assert patched == [all_patched(model, host_module)] * 3 + [(0, 0)] * 3
    with_checkpointing, without = deltas[True], deltas[False]
    assert set(with_checkpointing) == set(without) and len(without) == 20
    assert max(t.abs().max() for t in without.values()) > 1e-4
    for name, tensor in without.items():
        assert comfy_env.relative_error(with_checkpointing[name], tensor) < 1e-4, name


def saved_for_backward(host, delta, x_t, conds, grad: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for backward (outside checkpointed blocks) over one prediction of the trained model,
    and the delta's gradients of a loss on it (none without gradients). Backward runs with the delta switched off:
    a recomputed block must still see it as the forward did."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.set_grad_enabled(grad):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), delta.switched(True):
            prediction = host.predict(x_t, 421, conds)
        if grad:
            prediction.square().mean().backward()
    return sum(saved), {name: tensor.grad for name, tensor in delta.full.items()}


def test_checkpointing_gives_the_same_gradients_from_fewer_activations(comfy_model, host_module, monkeypatch):
    methods = comfy_env.pack_module("esd_core.methods")
    trainable = comfy_env.pack_module("esd_core.trainable")
    model, clip = comfy_model
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn((1, 4, 8, 8), generator=generator)
    saved, gradients, checkpoint_calls = {}, {}, {}
    with torch.inference_mode(False):
        conds = [(torch.randn((1, 77, 768), generator=generator), None) for _ in range(2)]
        for gradient_checkpointing in (True, False):
            host = host_module.ComfyErasureHost(model, clip, RESOLUTION, gradient_checkpointing)
            try:
                delta = trainable.TrainableDelta(methods.select_parameters(host.layer_tensors(), "esd-x"))
                with torch.no_grad():  # a non-zero delta, so the gradients are taken away from the base weights
                    for name, tensor in delta.full.items():
                        tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))) * 1e-3)
                with host.attach(delta):
                    calls.clear()
                    saved_no_grad, no_gradients = saved_for_backward(host, delta, x_t, conds, grad=False)
                    checkpoint_calls[gradient_checkpointing, False] = len(calls)
                    calls.clear()
                    saved[gradient_checkpointing], gradients[gradient_checkpointing] = saved_for_backward(host, delta, x_t, conds, grad=True)
                    checkpoint_calls[gradient_checkpointing, True] = len(calls)
                assert saved_no_grad == 0 and not any(g is not None for g in no_gradients.values())
            finally:
                host.release()
    blocks, _ = all_patched(model, host_module)
    assert checkpoint_calls == {(True, False): 0, (True, True): blocks, (False, False): 0, (False, True): 0}
    assert saved[True] < saved[False] / 3, saved
    assert set(gradients[True]) == set(gradients[False]) and len(gradients[False]) == 20
    for name, gradient in gradients[False].items():
        assert gradient.norm() > 0 and comfy_env.relative_error(gradients[True][name], gradient) < 1e-5, name


def test_release_restores_the_model_after_training_and_after_an_interrupt(env, comfy_model, host_module):
    import comfy.model_management
    import comfy.utils

    nodes = comfy_env.pack_module("nodes.erasure_nodes")
    model, clip = comfy_model
    forwards, tensors = own_forwards(model), weights(model)
    assert not any(forwards.values())
    patched = []
    with torch.inference_mode():  # as ComfyUI runs every node
        # the progress bar's hook (ComfyUI's UI updates) records the patches, and asks for an interrupt when told to
        interrupt = False

        def hook(value, total, preview, node_id=None):
            patched.append(memory_patched(model, host_module))
            if interrupt and value == 2:
                comfy.model_management.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            erased, delta, _ = nodes.train(model, clip, settings(gradient_checkpointing=True)).args
            assert_as_before(model, forwards, tensors)
            assert patched == [all_patched(model, host_module)] * SETTINGS["iterations"]
            assert set(erased.patches) == {"diffusion_model." + name for name in delta.deltas}
            interrupt, patched = True, []
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                nodes.train(model, clip, settings(gradient_checkpointing=True, seed=1))
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
            comfy.model_management.interrupt_current_processing(False)
    assert patched == [all_patched(model, host_module)] * 2  # stopped after the second update, patched until then
    assert_as_before(model, forwards, tensors)
    assert not model.patches and not model.weight_wrapper_patches


def test_row_wise_feed_forward_gives_the_same_output(comfy_model, host_module):
    import comfy.ldm.modules.attention

    model, _ = comfy_model
    block = next(m for m in model.model.diffusion_model.modules() if isinstance(m, comfy.ldm.modules.attention.BasicTransformerBlock))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        feed_forward = copy.deepcopy(block.ff)  # weights autograd may save (ComfyUI loads inference tensors)
        x = torch.randn((3, 64, block.ff.net[-1].out_features), generator=generator, requires_grad=True)
        whole = feed_forward(x)
        (whole_grad,) = torch.autograd.grad(whole.square().sum(), x)
        rows = host_module.row_wise(feed_forward.forward)(x)
        (rows_grad,) = torch.autograd.grad(rows.square().sum(), x)
    assert rows.shape == whole.shape == x.shape
    assert comfy_env.relative_error(rows, whole) < 1e-6
    assert comfy_env.relative_error(rows_grad, whole_grad) < 1e-6
    assert not torch.equal(rows[0], rows[1])
