"""The ESD engine on flow-matching transformers: tiny random-weight Flux.1-dev-, Flux.1-schnell- and SD3-shaped
pipelines (real weights cannot be downloaded here; the shapes of the real models are checked on the meta device in
test_selection_and_keys)."""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from esd_core.apply import applied_delta
from esd_core.cli import main
from esd_core.config import EraseConfig
from esd_core.diffusers_host import host_for, load_pipeline
from esd_core.erasure_file import ErasureDelta
from esd_core.esd import erase, train_erasure
from esd_core.flow_host import FlowDiffusersHost
from esd_core.lora_format import save_lora
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
    assert unchanged == ({"transformer_blocks.1.attn.add_q_proj.weight"} if kind == "sd3" else set())
    assert all(name.endswith(".weight") for name in erasure.deltas)  # transformers train weights only
    assert erasure.metadata["base_family"] == host.family and erasure.metadata["base_prediction"] == "flow"
    assert all(torch.equal(before[name], tensor) for name, tensor in host.transformer.state_dict().items())


@pytest.mark.parametrize("kind", ["flux-dev", "sd3"])
def test_saved_erasures_reload_and_diffusers_loads_the_lora_as_trained(flow_folders, tmp_path, kind):
    """The delta file (``transformer.<layer>.diff``) reads back exactly; the LoRA file (PEFT keys) loads with the
    pipeline's own ``load_lora_weights`` and predicts what the host predicts with the erasure attached."""
    host = flow_host(flow_folders[kind])
    config = EraseConfig(concept="red", method="esd-x", iterations=3, lr=1e-2, sample_steps=4, seed=0, rank=2)
    erasure = erase(host, config)
    erasure.save(str(tmp_path / "delta.safetensors"), torch.float32)
    save_lora(erasure, str(tmp_path / "lora.safetensors"), rank=2, dtype=torch.float32)
    with safe_open(str(tmp_path / "delta.safetensors"), "pt") as handle:
        assert all(key.startswith("transformer.transformer_blocks.") and key.endswith((".diff", ".diff_b")) for key in handle.keys())
    reloaded = ErasureDelta.load(str(tmp_path / "delta.safetensors"), host.layout, host.family)
    assert set(reloaded.deltas) == set(erasure.deltas)
    assert all(torch.allclose(reloaded.full(n), erasure.full(n), atol=1e-7) for n in erasure.deltas)

    x_t, conds = torch.randn(1, *host.latent_shape), [host.encode("red")]
    # a LoRA carries the weights' deltas, not the biases' (as every LoRA file)
    weights_only = ErasureDelta({n: d for n, d in erasure.deltas.items() if n.endswith(".weight")}, erasure.metadata)
    with torch.no_grad(), applied_delta(host.transformer, weights_only):
        erased = host.predict(x_t, 700.0, conds)
    original = host.predict(x_t, 700.0, conds)
    host.pipeline.load_lora_weights(str(tmp_path / "lora.safetensors"))
    with torch.no_grad():
        by_diffusers = host.predict(x_t, 700.0, conds)
    assert not torch.allclose(erased, original, atol=1e-3)
    assert torch.allclose(by_diffusers, erased, atol=1e-5), (by_diffusers - erased).abs().max()


def test_the_command_line_erases_a_flux_model_and_applies_it(flow_folders, tmp_path):
    """``esd-erase erase`` picks the flow host for a Flux folder (its guidance the distilled input), writes a LoRA in
    PEFT keys, and ``apply`` writes the erased transformer, which differs from the original where the LoRA says."""
    lora = tmp_path / "red.safetensors"
    assert main(["erase", "--model", flow_folders["flux-dev"], "--concept", "red", "--out", str(lora), "--iterations", "2",
                 "--lr", "1e-2", "--sample-steps", "4", "--resolution", str(RESOLUTION), "--sample-guidance", "3.5",
                 "--device", "cpu", "--save-dtype", "fp32"]) == 0
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.transformer_blocks.0.attn.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert metadata["base_family"] == "custom-flux-dev(width=16)" and metadata["base_prediction"] == "flow"
    assert metadata["modelspec.prediction_type"] == "flow"

    erased_file = tmp_path / "erased.safetensors"
    assert main(["apply", "--model", flow_folders["flux-dev"], "--delta", str(lora), "--out", str(erased_file)]) == 0
    erased, original = load_file(str(erased_file)), load_pipeline(flow_folders["flux-dev"]).transformer.state_dict()
    changed = {name for name in original if not torch.equal(erased[name], original[name])}
    assert changed == {k.replace("transformer.", "", 1).replace(".lora_A.weight", ".weight") for k in keys if k.endswith("lora_A.weight")}
