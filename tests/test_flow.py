"""The ESD engine on flow-matching transformers: tiny random-weight Flux.1-dev-, Flux.1-schnell- and SD3-shaped
pipelines (real weights cannot be downloaded here; the shapes of the real models are checked on the meta device in
test_selection_and_keys)."""

import pytest
import torch
from diffusers import FluxPipeline

from esd_core.config import EraseConfig
from esd_core.diffusers_host import host_for, load_pipeline
from esd_core.esd import erase, train_erasure
from esd_core.flow_host import FlowDiffusersHost
from esd_core.methods import text_stream_attention
from esd_core.sampling import guided_trajectory

RESOLUTION = 16  # pixels; the tiny VAE halves it: 8 x 8 latents, 16 Flux tokens


@pytest.fixture(scope="module")
def flow_folders(tmp_path_factory):
    from tests.tiny_models import FLOW_KINDS, tiny_flow_pipeline

    folders = {}
    for kind in FLOW_KINDS:
        folders[kind] = str(tmp_path_factory.mktemp(kind))
        tiny_flow_pipeline(kind, folders[kind])
    return folders


def flow_host(folder, guidance=3.5):
    return host_for(load_pipeline(folder), resolution=RESOLUTION, guidance=guidance)


@pytest.mark.parametrize("kind, guidance", [("flux-dev", 3.5), ("flux-schnell", 1.0), ("sd3", 4.0)])
def test_a_whole_trajectory_ends_where_the_pipelines_own_sampler_does(flow_folders, kind, guidance):
    """Run to the end, the ESD trajectory is the pipeline's own sampling: same schedule and shift, same guidance
    (SD3 true CFG, Flux-dev its distilled input, schnell none), same packing of Flux's latents."""
    host = flow_host(flow_folders[kind], guidance=guidance)
    assert isinstance(host, FlowDiffusersHost)
    steps, seed = 3, 7
    ours = guided_trajectory(host, host.sampling_scheduler(steps), steps, [host.encode("red")], host.encode(""), guidance,
                             torch.Generator().manual_seed(seed))[-1].latents
    noise = torch.randn((1, *host.latent_shape), generator=torch.Generator().manual_seed(seed))
    pipeline, (channels, height, width) = host.pipeline, host.latent_shape
    kwargs = dict(prompt="red", height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps, guidance_scale=guidance,
                  output_type="latent", max_sequence_length=host.max_sequence_length)
    if kind.startswith("flux"):
        packed = FluxPipeline._pack_latents(noise, 1, channels, height, width)
        theirs = FluxPipeline._unpack_latents(pipeline(latents=packed, **kwargs).images, RESOLUTION, RESOLUTION, host.vae_scale_factor)
    else:
        theirs = pipeline(latents=noise, negative_prompt="", **kwargs).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_flux_dev_takes_its_distilled_guidance_and_schnell_none(flow_folders):
    x_t = torch.randn(1, 4, 8, 8)
    dev = [flow_host(flow_folders["flux-dev"], guidance=g) for g in (1.0, 4.0)]
    assert not torch.allclose(*(host.predict(x_t, 600.0, [host.encode("red")]) for host in dev))
    schnell = flow_host(flow_folders["flux-schnell"])
    assert schnell.distilled_guidance is None and schnell.family == "custom-flux-schnell(width=16)"


class RecordingFlowHost(FlowDiffusersHost):
    """Remembers the arguments of the last prediction (the trainable one, at the end of an iteration)."""

    def predict(self, x_t, timestep, conds):
        self.last_call = (x_t.detach().clone(), timestep)
        return super().predict(x_t, timestep, conds)


@pytest.mark.parametrize("kind", ["flux-dev", "sd3"])
def test_the_target_is_negative_guidance_in_velocity_at_x_ts_own_sigma(flow_folders, kind):
    """At iteration 0 the delta is zero, so the loss is |vc - (v0 - eta (vc - v0))|^2 = (1 + eta)^2 |vc - v0|^2 with the
    velocities at the x_t and sigma the update trained on."""
    host = RecordingFlowHost(load_pipeline(flow_folders[kind]), resolution=RESOLUTION)
    losses, eta = [], 0.7
    config = EraseConfig(concept="red", method="esd-x", iterations=1, lr=1e-3, sample_steps=4, seed=3, eta=eta)
    train_erasure(host, config, lambda i, loss: losses.append(loss))
    x_t, timestep = host.last_call
    assert 0 < float(timestep[0]) <= 1000  # sigma * 1000 of a state on the trajectory
    v0, vc = host.predict(x_t, timestep, [host.encode(""), host.encode("red")])
    assert losses[0] == pytest.approx(((1 + eta) ** 2 * (vc - v0).square().mean()).item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["flux-dev", "flux-schnell", "sd3"])
def test_esd_x_erasure_trains_the_text_streams_attention_only_and_leaves_the_model_untouched(flow_folders, kind):
    host = flow_host(flow_folders[kind])
    before = {name: tensor.clone() for name, tensor in host.transformer.state_dict().items()}
    config = EraseConfig(concept="red", method="esd-x", iterations=3, lr=1e-3, sample_steps=4, seed=0)
    erasure = erase(host, config)
    assert erasure.deltas and all(text_stream_attention(name.rsplit(".", 1)[0]) for name in erasure.deltas)
    unchanged = {name for name in erasure.deltas if erasure.full(name).abs().max() == 0}
    # SD3's last block drops the text stream after its attention, so its text queries reach nothing: no gradient there.
    assert unchanged == ({"transformer_blocks.1.attn.add_q_proj.weight", "transformer_blocks.1.attn.add_q_proj.bias"} if kind == "sd3" else set())
    assert erasure.metadata["base_family"] == host.family and erasure.metadata["base_prediction"] == "flow"
    assert all(torch.equal(before[name], tensor) for name, tensor in host.transformer.state_dict().items())
