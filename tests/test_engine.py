"""The ESD engine on tiny random-weight SD1/SD2/SDXL pipelines: the math, the delta, the invariants."""

import pytest
import torch

from esd_core.apply import applied_delta
from esd_core.config import EraseConfig
from esd_core.diffusers_host import DiffusersHost, load_pipeline
from esd_core.erasure_file import ErasureDelta
from esd_core.esd import erase, train_erasure


def host_for(folder, dtype=torch.float32):
    return DiffusersHost(load_pipeline(folder, dtype=dtype))


def quick_config(**overrides):
    settings = dict(concept="red", method="esd-x", iterations=2, lr=1e-3, sample_steps=4, seed=3)
    settings.update(overrides)
    return EraseConfig(**settings)


def unet_eps(pipeline, x_t, timestep, text):
    """Epsilon straight from the diffusers UNet, independently of the host, every row of x_t under ``text``
    (SD1 only: epsilon prediction)."""
    embeds, _ = pipeline.encode_prompt(text, "cpu", 1, False)
    with torch.no_grad():
        return pipeline.unet(x_t, timestep, encoder_hidden_states=embeds.expand(len(x_t), -1, -1)).sample


class RecordingHost(DiffusersHost):
    """Remembers the arguments of the last prediction (the trainable one, at the end of an iteration)."""

    def predict(self, x_t, timestep, conds):
        self.last_call = (x_t.detach().clone(), timestep)
        return super().predict(x_t, timestep, conds)


@pytest.mark.parametrize("erase_from, sample_with", [("", "trained"), ("blue", "trained"), ("", "frozen")])
def test_loss_target_matches_the_paper(tiny_folders, erase_from, sample_with):
    """At iteration 0 the delta is zero, so the trainable prediction is ef and the loss is |ef - target|^2.

    With target = ef - eta*(ec - e0) that is eta^2 * mean((ec - e0)^2); computed here from independent UNet calls.
    """
    host = RecordingHost(load_pipeline(tiny_folders["sd1"]))
    losses = []
    eta = 0.7
    train_erasure(host, quick_config(iterations=1, eta=eta, erase_from=erase_from, sample_with=sample_with), lambda i, loss: losses.append(loss))
    x_t, timestep = host.last_call
    source = erase_from or "red"
    e0 = unet_eps(host.pipeline, x_t, timestep, "")
    ec = unet_eps(host.pipeline, x_t, timestep, "red")
    ef = unet_eps(host.pipeline, x_t, timestep, source)
    expected_target = (e0 if source == "red" else ef) - eta * (ec - e0)
    expected_loss = torch.mean((ef - expected_target) ** 2).item()
    assert losses[0] == pytest.approx(expected_loss, rel=1e-4)


def test_untrained_tensors_and_frozen_predictions_stay_identical(tiny_folders):
    host = host_for(tiny_folders["sd1"])
    before = {name: t.detach().clone() for name, t in host.unet.state_dict().items()}
    x = torch.randn(1, 4, 8, 8)
    conds = [host.encode(""), host.encode("red")]
    frozen_before = host.predict(x, 500, conds)
    erasure = erase(host, quick_config(method="esd-x"))
    after = host.unet.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert torch.equal(host.predict(x, 500, conds), frozen_before)
    assert erasure.deltas and all("attn2" in name for name in erasure.deltas)
    assert all(delta.abs().max() > 0 for delta in erasure.deltas.values())


def test_one_step_at_lr_1e_5_changes_every_selected_tensor_in_bf16(tiny_folders):
    host = host_for(tiny_folders["sd1"], torch.bfloat16)
    trained = train_erasure(host, quick_config(iterations=1, lr=1e-5))
    for name, delta in trained.full.items():
        assert delta.dtype == torch.float32
        assert delta.abs().max().item() == pytest.approx(1e-5, rel=0.05), name  # Adam's first step moves by ~lr
    # The bf16 model sees the step: the delta's share is added to each layer's output, not rounded into W.
    x, conds = torch.randn(1, 4, 8, 8), [host.encode("red")]
    with host.attach(trained), torch.no_grad():
        with trained.switched(False):
            before = host.predict(x, 500, conds)
        with trained.switched(True):
            after = host.predict(x, 500, conds)
    assert not torch.equal(before, after)


def test_training_is_reproducible(tiny_folders):
    first = erase(host_for(tiny_folders["sd1"]), quick_config())
    second = erase(host_for(tiny_folders["sd1"]), quick_config())
    assert first.deltas.keys() == second.deltas.keys()
    assert all(torch.equal(first.deltas[name], second.deltas[name]) for name in first.deltas)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_saved_delta_reproduces_the_trained_model(tiny_folders, tmp_path, family):
    """Written, loaded and applied at strength 1, the delta gives the trained predictions; at 0 the base, bit-exactly."""
    host = host_for(tiny_folders[family])
    config = quick_config(method="esd-u" if family == "sd2" else "esd-x")
    trained = train_erasure(host, config)
    x = torch.randn(1, 4, 8, 8)
    conds = [host.encode("red"), host.encode("a blue cat")]
    base = host.predict(x, 400, conds)
    with host.attach(trained), trained.switched(True), torch.no_grad():
        erased = host.predict(x, 400, conds)
    assert not torch.allclose(erased, base)

    path = tmp_path / "erasure.safetensors"
    erase_result = erase(host_for(tiny_folders[family]), config)
    erase_result.save(str(path), torch.float32)
    loaded = ErasureDelta.load(str(path))
    assert loaded.metadata["concept"] == "red" and loaded.metadata["base_family"] == host.family
    with applied_delta(host.unet, loaded, 1.0):
        assert torch.allclose(host.predict(x, 400, conds), erased, rtol=1e-4, atol=1e-5)
    with applied_delta(host.unet, loaded, 0.0):
        assert torch.equal(host.predict(x, 400, conds), base)
    assert torch.equal(host.predict(x, 400, conds), base)


def test_v_prediction_is_converted_to_epsilon(tiny_folders):
    host = host_for(tiny_folders["sd2"])
    x_t = torch.randn(1, 4, 8, 8)
    cond = host.encode("red")
    with torch.no_grad():
        v = host.unet(x_t, 300, encoder_hidden_states=cond[0]).sample
    alpha = host.pipeline.scheduler.alphas_cumprod[300]
    # x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0 give eps = sqrt(a) v + sqrt(1-a) x_t.
    assert torch.allclose(host.predict(x_t, 300, [cond]), alpha.sqrt() * v + (1 - alpha).sqrt() * x_t, atol=1e-6)


def test_sdxl_conditioning_uses_pooled_embeddings_and_time_ids(tiny_folders):
    host = host_for(tiny_folders["sdxl"])
    embeds, pooled = host.encode("red")
    assert embeds.shape[-1] == 64 and pooled.shape == (1, 32)
    eps = host.predict(torch.randn(1, 4, 8, 8), 500, [host.encode(""), (embeds, pooled)])
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()


def test_reference_mode_draws_a_fresh_trajectory_per_update(tiny_folders):
    host = RecordingHost(load_pipeline(tiny_folders["sd1"]))
    calls = []
    original = host.predict
    host.predict = lambda x, t, conds: calls.append(len(conds)) or original(x, t, conds)
    train_erasure(host, quick_config(mode="reference", iterations=3, sample_steps=6))
    # per update: k guided passes of 2 rows, one frozen pass of 2 rows, one trainable pass of 1 row
    assert calls.count(1) == 3
    assert calls[-1] == 1 and calls[-2] == 2


def test_reference_mode_samples_one_updates_trajectories_together_each_to_its_own_step(tiny_folders):
    from esd_core.esd import TrainingRun, reference_examples
    from esd_core.trainable import TrainableDelta

    host = host_for(tiny_folders["sd1"])
    calls = []
    original = host.predict
    host.predict = lambda x, t, conds: calls.append(len(conds)) or original(x, t, conds)
    config = quick_config(mode="reference", sample_steps=10, batch_size=4)
    run = TrainingRun(host, TrainableDelta({}), config, torch.Generator().manual_seed(0))
    examples = reference_examples(run, config.pairs, True)
    batch = [next(examples) for _ in range(4)]
    assert set(calls) == {8, 2}  # guided passes of 4 trajectories x (uncond, cond); one frozen (e0, ec) pass per example
    assert calls.count(2) == 4 and calls.count(8) == max(run.scheduler.timesteps.tolist().index(e.timestep) for e in batch)
    assert len({int(e.timestep) for e in batch}) > 1  # each row stopped at its own step count
    assert len({e.x_t.sum().item() for e in batch}) == 4  # four different trajectories


@pytest.mark.parametrize("reuse", [10, 20])
def test_fast_mode_serves_every_step_count_equally_from_a_batch_of_trajectories(tiny_folders, reuse):
    from esd_core.esd import TrainingRun, reused_trajectory_examples
    from esd_core.trainable import TrainableDelta

    host = host_for(tiny_folders["sd1"])
    config = quick_config(sample_steps=10, trajectories=2, reuse=reuse)
    run = TrainingRun(host, TrainableDelta({}), config, torch.Generator().manual_seed(0))
    examples = reused_trajectory_examples(run, config.pairs, True)
    batch = [next(examples) for _ in range(2 * reuse)]  # one batch of trajectories serves 2 * reuse updates
    timesteps = [int(example.timestep) for example in batch]
    for t in run.scheduler.timesteps:  # every step count, reuse / 10 times per trajectory
        assert timesteps.count(int(t)) == 2 * reuse // 10
    assert timesteps != sorted(timesteps, reverse=True)
    assert len({example.x_t.data_ptr() for example in batch}) == 2 * min(reuse, 10)  # distinct states of both trajectories


def test_batched_trajectories_equal_one_at_a_time(tiny_folders):
    from esd_core.esd import TrainingRun
    from esd_core.trainable import TrainableDelta

    host = host_for(tiny_folders["sd1"])
    def states(sources):
        run = TrainingRun(host, TrainableDelta({}), quick_config(concept="red, blue", sample_steps=6), torch.Generator().manual_seed(0))
        return run.trajectories(sources, 5, True)
    (red, blue), (single,) = states(["red", "blue"]), states(["red"])
    assert red[-1].timestep == blue[-1].timestep == single[-1].timestep
    assert torch.allclose(red[-1].x_t, single[-1].x_t, atol=1e-4)  # same noise row, same cond
    assert not torch.allclose(red[-1].x_t, blue[-1].x_t, atol=1e-2)


def test_batched_frozen_targets_equal_one_at_a_time(tiny_folders):
    from esd_core.esd import TrainingRun
    from esd_core.trainable import TrainableDelta

    host = host_for(tiny_folders["sd1"])
    run = TrainingRun(host, TrainableDelta({}), quick_config(erase_from="blue", sample_steps=6), torch.Generator().manual_seed(0))
    (states,) = run.trajectories(["blue"], 5, True)  # sampled with the (empty) delta on: no predictions to reuse
    batched = [target for target, _ in run.targets(states, ("red", "blue"))]
    single = [run.targets([state], ("red", "blue"))[0][0] for state in states]
    assert all(torch.allclose(b, s, atol=1e-5) for b, s in zip(batched, single))


@pytest.mark.parametrize("pair", [("red", "red"), (None, "blue"), (None, "")])
def test_a_frozen_trajectorys_own_predictions_serve_as_its_targets(tiny_folders, monkeypatch, pair):
    """Where the frozen model sampled a trajectory, its e('') and e(source) at each state it stepped on from are
    the frozen predictions the targets need (an erased pair's, a guided preserved text's, the empty prompt's):
    taken from there (no new pass), they equal freshly predicted ones. The last state, and every state the
    trained model sampled, is predicted."""
    from esd_core.esd import SampledState, TrainingRun
    from esd_core.trainable import TrainableDelta

    host = host_for(tiny_folders["sd1"])
    config = quick_config(sample_steps=6, hold_unconditional=1.0, preserve="blue", preserve_guidance=3.0)
    run = TrainingRun(host, TrainableDelta({}), config, torch.Generator().manual_seed(0))
    source = pair[1]
    (frozen,), (trained,) = run.trajectories([source], 5, False), run.trajectories([source], 5, True)
    texts_per_state = 2 if source else 1  # e('') and e(source); the empty prompt's target is e('') alone
    predicted_rows = []
    predict = host.predict
    monkeypatch.setattr(host, "predict", lambda x_t, timestep, conds: predicted_rows.append(len(conds)) or predict(x_t, timestep, conds))

    from_trajectory = run.targets(frozen, pair)
    assert predicted_rows == [texts_per_state]  # the last state's
    fresh = run.targets([SampledState(state.x_t, state.timestep) for state in frozen], pair)
    assert len(from_trajectory) == len(fresh) == 6
    for (target, held), (fresh_target, fresh_held) in zip(from_trajectory, fresh):
        assert torch.allclose(target, fresh_target, atol=1e-5)
        assert (held is None and fresh_held is None) or torch.allclose(held, fresh_held, atol=1e-5)
    predicted_rows.clear()
    run.targets(trained, pair)
    assert sum(predicted_rows) == texts_per_state * len(trained)


def test_preservation_targets_the_frozen_prediction_and_adds_nothing_at_the_start(tiny_folders):
    """At iteration 0 the delta is zero, so the preserved texts' predictions equal their targets: the first
    loss is the erasure term alone, on the same x_t as without preservation; later updates feel the term."""
    plain, preserving = [], []
    train_erasure(host_for(tiny_folders["sd1"]), quick_config(iterations=3, mode="reference"), lambda i, loss: plain.append(loss))
    config = quick_config(iterations=3, mode="reference", preserve="blue, green", preserve_weight=5.0)
    assert config.preserved == ["", "blue", "green"]
    train_erasure(host_for(tiny_folders["sd1"]), config, lambda i, loss: preserving.append(loss))
    assert preserving[0] == pytest.approx(plain[0], rel=1e-5)


def test_preservation_keeps_the_preserved_prediction_closer_to_the_original(tiny_folders):
    """Erase red with and without preserving blue; compare how far the prediction for blue moved, on states of
    a blue trajectory of the original model."""
    from esd_core.esd import TrainingRun
    from esd_core.trainable import TrainableDelta

    def blue_change(**preservation):
        host = host_for(tiny_folders["sd1"])
        run = TrainingRun(host, TrainableDelta({}), quick_config(concept="blue", sample_steps=8), torch.Generator().manual_seed(1))
        states = [state for row in run.trajectories(["blue"] * 2, 6, False) for state in row[1::2]]  # 3 states of 2 trajectories
        x_t = torch.cat([state.x_t for state in states])
        timesteps = torch.tensor([state.timestep for state in states])
        blue = [host.encode("blue")] * len(x_t)
        original = host.predict(x_t, timesteps, blue)
        delta = train_erasure(host, quick_config(iterations=40, lr=1e-3, sample_steps=8, **preservation))
        with host.attach(delta), delta.switched(True), torch.no_grad():
            return (host.predict(x_t, timesteps, blue) - original).norm().item()

    assert blue_change(preserve="blue", preserve_weight=10.0) < 0.75 * blue_change()  # measured: 0.59 vs 0.95


@pytest.mark.parametrize("sample_with, erased_trained, preserved_trained",
                         [("trained", True, True), ("frozen", False, False), ("mixed", False, True)])
def test_sample_with_picks_the_model_that_samples_each_streams_x_t(tiny_folders, monkeypatch, sample_with, erased_trained, preserved_trained):
    from esd_core.esd import TrainingRun

    sampled = []  # (whether the sources are the erased text, whether the trained model samples them)
    original = TrainingRun.trajectories
    def recording(run, sources, steps, trained):
        sampled.append((set(sources) == {"red"}, trained))
        return original(run, sources, steps, trained)
    monkeypatch.setattr(TrainingRun, "trajectories", recording)
    train_erasure(host_for(tiny_folders["sd1"]), quick_config(mode="reference", preserve="blue", sample_with=sample_with))
    assert set(sampled) == {(True, erased_trained), (False, preserved_trained)}


def test_preserving_the_erased_concept_is_refused():
    with pytest.raises(ValueError, match="both erased and preserved"):
        quick_config(concept="red, blue", preserve="green, blue")
    with pytest.raises(ValueError, match=r"\['Van  Gogh'\] is both erased and preserved"):  # the tokenizer ignores case and spaces
        quick_config(concept="red, van gogh", preserve="green, Van  Gogh")
    with pytest.raises(ValueError, match=r"\['Painting'\] is both erased and preserved"):  # erase_from's prediction is the one trained
        quick_config(concept="van gogh", erase_from="painting", preserve="Painting")
    quick_config(concept="van gogh", erase_from="painting", preserve="van gogh")  # the concept's own prediction is not trained


def test_low_rank_delta_is_a_product_and_saves_full_shape(tiny_folders):
    host = host_for(tiny_folders["sd1"])
    trained = train_erasure(host, quick_config(method="esd-u", rank=2))
    full = train_erasure(host_for(tiny_folders["sd1"]), quick_config(method="esd-u"))
    assert trained.factors and trained.parameter_count() < full.parameter_count() / 3
    for name, (up, down) in trained.factors.items():
        assert up.shape[1] == down.shape[0] == 2
        assert torch.linalg.matrix_rank(trained.delta(name).detach().reshape(up.shape[0], -1)) <= 2
    assert {n: t.shape for n, t in trained.detached().items()} == {n: t.shape for n, t in full.detached().items()}
    assert any(trained.delta(name).abs().max() > 0 for name in trained.factors)


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_output_change_equals_adding_the_delta_to_the_weights(rank, layer):
    """The diffusers host adds x's share of the delta to the output; that must equal (W + delta) applied to x."""
    from esd_core.trainable import TrainableDelta

    torch.manual_seed(0)
    module = torch.nn.Linear(12, 10) if layer == "linear" else torch.nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 5, 12) if layer == "linear" else torch.randn(2, 6, 9, 9)
    delta = TrainableDelta({"layer.weight": module.weight, "layer.bias": module.bias}, rank=rank)
    with torch.no_grad():
        for tensor in delta.parameters():
            tensor.normal_()
    expected = (
        torch.nn.functional.linear(x, module.weight + delta.delta("layer.weight"), module.bias + delta.delta("layer.bias"))
        if layer == "linear"
        else module._conv_forward(x, module.weight + delta.delta("layer.weight"), module.bias + delta.delta("layer.bias"))
    )
    assert torch.allclose(module(x) + delta.output_change(module, "layer", x), expected, atol=1e-4)
    assert (rank == 0) == ("layer.weight" in delta.full)


@pytest.mark.parametrize("rank", [0, 2])
def test_adding_the_delta_to_the_weights_or_to_the_outputs_predicts_and_trains_alike(tiny_folders, monkeypatch, rank):
    """A small fp32 UNet gets its deltas added to its weights, any other to its layers' outputs (``adds_to_weights``);
    the two must give the same predictions and the same gradients."""
    import esd_core.diffusers_host as diffusers_host
    from esd_core.methods import select_parameters
    from esd_core.trainable import TrainableDelta

    host = host_for(tiny_folders["sd1"])
    generator = torch.Generator().manual_seed(0)
    delta = TrainableDelta(select_parameters(host.layer_tensors(), "esd-u"), rank, generator)
    for tensor in delta.parameters():
        tensor.data.normal_(0, 0.02, generator=generator)
    x, conds = torch.randn(2, 4, 8, 8, generator=generator), [host.encode("red"), host.encode("")]

    def predictions_and_gradients():
        with host.attach(delta), delta.switched(True):
            eps = host.predict(x, 500, conds)
            eps.square().mean().backward()
        gradients = [tensor.grad for tensor in delta.parameters()]
        for tensor in delta.parameters():
            tensor.grad = None
        return eps.detach(), gradients

    assert host.adds_to_weights(delta)
    by_weights, weight_gradients = predictions_and_gradients()
    monkeypatch.setattr(diffusers_host, "WEIGHT_DELTA_MAX_BYTES", 0)
    assert not host.adds_to_weights(delta)
    by_outputs, output_gradients = predictions_and_gradients()
    assert not torch.allclose(by_weights, host.predict(x, 500, conds), atol=1e-3)  # the delta is felt
    assert torch.allclose(by_weights, by_outputs, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(weight_gradients, output_gradients))


def test_gradient_checkpointing_trains_the_same_delta(tiny_folders):
    config = quick_config(method="esd-u", rank=2, iterations=3)
    plain = ErasureDelta(train_erasure(host_for(tiny_folders["sd1"]), config).detached())
    host = DiffusersHost(load_pipeline(tiny_folders["sd1"]), gradient_checkpointing=True)
    checkpointed = ErasureDelta(train_erasure(host, config).detached())
    assert all(torch.allclose(plain.full(name), checkpointed.full(name), atol=1e-6) for name in plain.deltas)
    assert any(plain.full(name).abs().max() > 0 for name in plain.deltas)


def test_a_cpu_host_runs_a_large_unets_feed_forwards_row_by_row_with_the_same_predictions(tiny_folders, monkeypatch):
    """On the CPU a small UNet's feed-forwards run whole, a large one's (here: any, with the threshold at 0) one
    row at a time; the predictions are the same."""
    import esd_core.diffusers_host as diffusers_host

    pipeline = load_pipeline(tiny_folders["sd1"])
    config = pipeline.unet.config
    x_t = torch.randn(3, config.in_channels, config.sample_size, config.sample_size, generator=torch.Generator().manual_seed(0))
    whole = unet_eps(pipeline, x_t, 500, "red")

    def rows_per_feed_forward(host):
        rows_seen = []
        feed_forwards = [module for name, module in host.unet.named_modules() if name.endswith(".ff")]
        handles = [ff.register_forward_hook(lambda module, inputs, output: rows_seen.append(inputs[0].shape[0])) for ff in feed_forwards]
        with torch.no_grad():
            eps = host.predict(x_t, 500, [host.encode("red")] * 3)
        for handle in handles:
            handle.remove()
        assert feed_forwards and len(rows_seen) % len(feed_forwards) == 0
        return set(rows_seen), eps

    assert rows_per_feed_forward(DiffusersHost(pipeline))[0] == {3}
    monkeypatch.setattr(diffusers_host, "WHOLE_FEED_FORWARD_MAX_BYTES", 0)
    rows_seen, row_by_row = rows_per_feed_forward(DiffusersHost(pipeline))
    assert rows_seen == {1}
    assert torch.allclose(whole, row_by_row, atol=1e-5)


def test_an_update_trains_on_batch_size_examples_of_each_stream(tiny_folders):
    host = RecordingHost(load_pipeline(tiny_folders["sd1"]))
    train_erasure(host, quick_config(iterations=2, batch_size=2, preserve="blue"))
    x_t, timesteps = host.last_call
    assert x_t.shape[0] == 4 and len(timesteps) == 4  # 2 erased + 2 preserved examples, one pass


def random_delta(host, method: str, std: float):
    """A delta of the method's weights drawn from N(0, std), so that the trained and the frozen predictions differ."""
    from esd_core.methods import select_parameters
    from esd_core.trainable import TrainableDelta

    generator = torch.Generator().manual_seed(0)
    delta = TrainableDelta(select_parameters(host.layer_tensors(), method), 0, generator)
    for tensor in delta.parameters():
        tensor.data.normal_(0, std, generator=generator)
    return delta, generator


def losses_one_example_at_a_time(run, state, pairs):
    """One example of each pair at ``state`` and the loss ``update`` computes for it alone (at learning rate 0)."""
    from esd_core.esd import update

    examples = [run.example(state, pair, *run.targets([state], pair)[0]) for pair in pairs]
    unchanged = torch.optim.SGD(run.delta.parameters(), lr=0.0)
    return examples, [update(run, unchanged, [example], [1.0], 0) for example in examples]


def prediction(host, delta, state, text, trained: bool):
    """The trained or the frozen model's epsilon for ``text`` at ``state``."""
    with delta.switched(trained), torch.no_grad():
        return host.predict(state.x_t, torch.tensor([state.timestep]), [host.encode(text)])


def test_a_guided_preservation_compares_what_a_sampler_at_that_guidance_draws(tiny_folders):
    """With preserve_guidance g a preserved text's loss is the MSE between the trained and the frozen guided
    predictions u + g (c - u), divided by g^2 (predictions of both models at the same x_t, here with a nonzero
    delta); the empty prompt, which has no guidance, keeps the plain comparison."""
    from esd_core.esd import TrainingRun

    host = host_for(tiny_folders["sd1"])
    delta, generator = random_delta(host, "esd-x", 0.05)
    with host.attach(delta):
        run = TrainingRun(host, delta, quick_config(preserve="blue", preserve_guidance=3.0), generator)
        state = run.trajectories(["blue"], 2, False)[0][2]
        examples, losses = losses_one_example_at_a_time(run, state, [(None, "blue"), (None, "")])

        def eps(text, trained):
            return prediction(host, delta, state, text, trained)

        def guided(trained):
            return eps("", trained) + 3.0 * (eps("blue", trained) - eps("", trained))

        expected = torch.mean((guided(True) - guided(False)) ** 2).item() / 9.0
        plain = torch.mean((eps("blue", True) - eps("blue", False)) ** 2).item()
        empty = torch.mean((eps("", True) - eps("", False)) ** 2).item()
    assert [example.guidance for example in examples] == [3.0, 1.0]
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert losses[0] != pytest.approx(plain, rel=1e-2)
    assert losses[1] == pytest.approx(empty, rel=1e-4)


def test_holding_the_unconditional_adds_the_empty_prompts_drift_at_the_erased_examples_x_t(tiny_folders):
    """With hold_unconditional w an erased example's loss is its ESD term plus w times the MSE between the trained
    and the frozen empty-prompt predictions at its x_t (here with a nonzero delta); a preserved example gets no such term."""
    from esd_core.esd import TrainingRun, esd_target

    host = host_for(tiny_folders["sd1"])
    delta, generator = random_delta(host, "esd-u", 0.02)
    with host.attach(delta):
        run = TrainingRun(host, delta, quick_config(method="esd-u", eta=2.0, preserve="blue", hold_unconditional=0.5), generator)
        state = run.trajectories(["red"], 2, False)[0][2]
        examples, losses = losses_one_example_at_a_time(run, state, [("red", "red"), (None, "blue")])

        def eps(text, trained):
            return prediction(host, delta, state, text, trained)

        target = esd_target(eps("", False), eps("red", False), None, 2.0)
        erasing = torch.mean((eps("red", True) - target) ** 2).item()
        drift = torch.mean((eps("", True) - eps("", False)) ** 2).item()
        kept = torch.mean((eps("blue", True) - eps("blue", False)) ** 2).item()
    assert examples[1].unconditional is None and drift > 1e-4 * erasing
    assert losses[0] == pytest.approx(erasing + 0.5 * drift, rel=1e-4)
    assert losses[1] == pytest.approx(kept, rel=1e-4)


def test_another_erased_concepts_direction_loses_only_the_part_that_points_back():
    """away_from_others keeps a direction that does not oppose the concept's own, and of one that does it removes
    exactly the opposing part, row by row."""
    from esd_core.esd import away_from_others

    e0 = torch.zeros(2, 4, 3, 3)
    own = torch.zeros_like(e0)
    own[:, 0] = 1.0
    helping, opposing = torch.zeros_like(e0), torch.zeros_like(e0)
    helping[:, 0], helping[:, 1] = 0.5, 2.0
    opposing[0, 0], opposing[0, 1] = -3.0, 2.0  # row 0 points back; row 1 does not
    opposing[1, 0], opposing[1, 2] = 1.0, 1.0
    assert torch.equal(away_from_others(e0, own, [helping]), helping)
    kept = away_from_others(e0, own, [opposing])
    assert torch.equal(kept[0, 0], torch.zeros(3, 3)) and torch.equal(kept[0, 1], torch.full((3, 3), 2.0))
    assert torch.equal(kept[1], opposing[1])
    assert torch.equal(away_from_others(e0, own, []), torch.zeros_like(e0))


def without_opposing(direction, own):
    """The test's own statement of the rule: ``direction`` less its part along ``own`` when that part is negative."""
    along = float((direction * own).sum() / (own * own).sum())
    return direction - min(along, 0.0) * own


@pytest.mark.parametrize("away_from", ["all", "own"])
def test_several_erased_concepts_lead_each_away_from_all_of_them_or_only_its_own(tiny_folders, away_from):
    """Erasing red and blue: with away_from "all" red's target is e0 - eta ((e_red - e0) + d_blue), d_blue being
    e_blue - e0 without any part that points against e_red - e0, so that red does not turn into the erased blue;
    with "own" it is the paper's e0 - eta (e_red - e0). Erasing from another text keeps that text's prediction as the anchor."""
    from esd_core.esd import TrainingRun

    host = host_for(tiny_folders["sd1"])
    delta, generator = random_delta(host, "esd-x", 0.0)
    with host.attach(delta):
        run = TrainingRun(host, delta, quick_config(concept="red, blue", erase_from="red, star", eta=2.0, away_from=away_from), generator)
        state = run.trajectories(["red"], 2, False)[0][2]

        def eps(text):
            return prediction(host, delta, state, text, False)

        def direction(text):
            return eps(text) - eps("")

        others = without_opposing(direction("blue"), direction("red")) if away_from == "all" else 0.0
        assert torch.allclose(run.targets([state], ("red", "red"))[0][0], eps("") - 2.0 * (direction("red") + others), atol=1e-5)
        others = without_opposing(direction("red"), direction("blue")) if away_from == "all" else 0.0
        assert torch.allclose(run.targets([state], ("blue", "star"))[0][0], eps("star") - 2.0 * (direction("blue") + others), atol=1e-5)


def test_a_preserved_text_can_be_led_away_from_the_erased_concepts_too(tiny_folders):
    """With preserve_eta v a preserved text's target is its frozen prediction (guided first, at preserve_guidance g)
    minus v times the erased concepts' directions, each without any part that points against the text's own
    direction (which would only amplify the text); the empty prompt's target stays its frozen prediction."""
    from esd_core.esd import TrainingRun, guided

    host = host_for(tiny_folders["sd1"])
    delta, generator = random_delta(host, "esd-x", 0.0)
    with host.attach(delta):
        config = quick_config(concept="red, blue", preserve="star", preserve_eta=0.5, preserve_guidance=2.0)
        run = TrainingRun(host, delta, config, generator)
        state = run.trajectories(["star"], 2, False)[0][2]

        def eps(text):
            return prediction(host, delta, state, text, False)

        star = eps("star") - eps("")
        away = 0.5 * sum(without_opposing(eps(c) - eps(""), star) for c in ("red", "blue"))
        assert torch.allclose(run.targets([state], (None, "star"))[0][0], guided(eps("star"), eps(""), 2.0) - away, atol=1e-5)
        assert torch.allclose(run.targets([state], (None, ""))[0][0], eps(""), atol=1e-6)


@pytest.mark.parametrize("hold", [-1.0, float("inf")])
def test_a_negative_or_infinite_unconditional_hold_is_refused(hold):
    with pytest.raises(ValueError, match="hold_unconditional must be a finite number from 0.0 to 100.0"):
        quick_config(hold_unconditional=hold)


@pytest.mark.parametrize("guidance", [0.5, float("nan")])
def test_a_preserve_guidance_below_1_is_refused(guidance):
    with pytest.raises(ValueError, match="preserve_guidance must be a finite number from 1.0 to 30.0"):
        quick_config(preserve="blue", preserve_guidance=guidance)
