"""The attack (a learned token, Concept Inversion) and the adversarial erasure, on tiny models."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from esd_core.attack import TOKEN, InversionSettings, concept_latents, denoising_loss, encode_templates, invert_token, neutral_vectors
from esd_core.cli import main
from esd_core.config import EraseConfig
from esd_core.diffusers_host import DiffusersHost, load_pipeline
from esd_core.esd import TrainingRun, train_erasure
from esd_core.trainable import TrainableDelta


def host_for(folder):
    return DiffusersHost(load_pipeline(folder))


def word_vectors(host, word):
    """Each text encoder's embedding of a word that its tokenizer reads as one token."""
    tokenizers = [t for t in (host.pipeline.tokenizer, getattr(host.pipeline, "tokenizer_2", None)) if t is not None]
    ids = [tokenizer(word, add_special_tokens=False).input_ids for tokenizer in tokenizers]
    assert all(len(i) == 1 for i in ids)
    return [table[i[0]].detach() for table, i in zip(host.token_tables(), ids)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_token_given_a_words_vectors_encodes_as_that_word(tiny_folders, family):
    """With the learned token set to a word's own embedding, a prompt encodes exactly as the prompt with the word
    (SDXL: both encoders' hidden states and the pooled output), and the pipeline's tokenizers are left as they were."""
    host = host_for(tiny_folders[family])
    tokenizers = (host.pipeline.tokenizer, getattr(host.pipeline, "tokenizer_2", None))
    with_word = host.encode("a b c")
    with_token = host.encode_with_token(f"a {TOKEN} c", TOKEN, word_vectors(host, "b"))
    for expected, got in zip(with_word, with_token):
        if expected is not None:
            assert torch.equal(expected, got)
    assert (host.pipeline.tokenizer, getattr(host.pipeline, "tokenizer_2", None)) == tokenizers
    assert TOKEN not in host.pipeline.tokenizer.get_vocab()
    other = host.encode_with_token(f"a {TOKEN} c", TOKEN, word_vectors(host, "x"))
    assert not torch.equal(other[0], with_word[0])


def test_the_inversion_learns_a_token_that_draws_the_images_better_than_where_it_started(tiny_folders):
    """Textual inversion lowers the denoising loss of the concept's images under the learned token (the same noise
    and timesteps for both tokens), and gradients reach the token through the text encoder only."""
    host = host_for(tiny_folders["sd1"])
    generator = torch.Generator().manual_seed(0)
    latents = concept_latents(host, ["red"], 4, generator, steps=4, guidance=3.0)
    templates = ["{}", "a {}"]
    token = invert_token(host, latents, templates, InversionSettings(steps=40, lr=5e-2, batch_size=4, images=4), generator, snapshot_steps=(20,))

    def loss_of(vectors):
        conds = encode_templates(host, templates, vectors) * 8
        with torch.no_grad():
            return denoising_loss(host, latents, conds, torch.Generator().manual_seed(1)).item()

    assert loss_of(token.vectors) < loss_of(neutral_vectors(host))
    assert len(token.losses) == 40 and list(token.snapshots) == [20]
    assert all(p.grad is None for p in host.unet.parameters())


def test_concept_latents_run_the_whole_trajectory_to_timestep_0(tiny_folders):
    from esd_core.sampling import guided_trajectory

    host = host_for(tiny_folders["sd1"])
    scheduler = host.sampling_scheduler(4)
    states = guided_trajectory(host, scheduler, 4, [host.encode("red")], host.encode(""), 3.0, torch.Generator().manual_seed(0))
    assert [state.timestep for state in states] == [*scheduler.timesteps.tolist(), 0]


def test_the_attack_command_writes_a_token_a_grid_and_the_judged_groups(tmp_path, capsys):
    """On the tiny world (a short run): the erased, synonym, attack, random-token and base groups are judged; the
    token is an embedding file ComfyUI and A1111 load (emb_params, one row of the text encoder's width)."""
    delta = tmp_path / "circle.safetensors"
    assert main(["erase", "--concept", "circle", "--iterations", "2", "--out", str(delta)]) == 0
    out = tmp_path / "attack"
    code = main(["attack", "--delta", str(delta), "--concept", "disc", "--steps", "2", "--images", "2", "--n", "2", "--out-dir", str(out)])
    assert code == 0
    result = json.loads((out / "attack-circle.json").read_text())
    assert result["concept"] == "circle"
    assert [(g["name"], g["model"]) for g in result["groups"]] == [
        ("base", "base"), ("base attack", "base"), ("erased", "erased"), ("synonym", "erased"), ("attack", "erased"), ("random token", "erased")]
    assert all(g["n"] == 2 and 0 <= g["rate"] <= 1 for g in result["groups"])
    assert len(result["losses"]) == 2
    token = load_file(out / "attack-circle-token.safetensors")
    assert list(token) == ["emb_params"] and token["emb_params"].shape == (1, 64)
    assert os.path.getsize(out / "attack-circle-grid.png") > 0
    assert "attack" in capsys.readouterr().out


def test_an_attack_on_a_file_that_is_not_an_erasure_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "attack"
    assert main(["attack", "--delta", str(bad), "--concept", "circle", "--out-dir", str(out)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_a_stand_in_is_trained_towards_its_source_texts_esd_target(tiny_folders):
    """A conditioning the adversary found stands in for its source text: the target at a state is the frozen
    model's ESD target of the concept itself, whatever the stand-in's own conditioning predicts."""
    host = host_for(tiny_folders["sd1"])
    run = TrainingRun(host, TrainableDelta({}), EraseConfig(concept="red", iterations=1, sample_steps=4), torch.Generator().manual_seed(0))
    context, pooled = run.conds["red"]
    run.conds["<adversarial red>"] = (context + 0.5 * torch.randn_like(context), pooled)
    run.stand_ins["<adversarial red>"] = "red"
    (states,) = run.trajectories(["<adversarial red>"], 3, trained=False)
    as_stand_in = run.targets(states, ("red", "<adversarial red>"))
    as_source = run.targets(states, ("red", "red"))
    for (target, _), (expected, _) in zip(as_stand_in, as_source):
        assert torch.allclose(target, expected, atol=1e-6)


def test_an_adversarial_erasure_adds_what_its_attacks_find_to_the_erased_set(tiny_folders, monkeypatch):
    """Every adversarial_every updates an attack runs; the conditioning it found is the concept's plus an offset
    that moves from attack to attack, and the erased pairs draw it besides the concept."""
    from esd_core import adversary as adversary_module

    host = host_for(tiny_folders["sd1"])
    attacks, runs = [], []
    original_attack = adversary_module.Adversary.attack

    def recording_attack(self):
        original_attack(self)
        runs.append(self.run)
        attacks.append(self.offsets["red"].clone())

    monkeypatch.setattr(adversary_module.Adversary, "attack", recording_attack)
    config = EraseConfig(concept="red", iterations=5, lr=1e-3, sample_steps=4, adversarial=True, adversarial_every=2, adversarial_steps=3)
    train_erasure(host, config)
    assert len(attacks) == 3  # at updates 0, 2 and 4
    assert all(not torch.equal(a, b) for a, b in zip(attacks, attacks[1:]))
    run = runs[-1]
    assert run.erased_pairs == [("red", "red"), ("red", "<adversarial red>")]
    assert torch.allclose(run.conds["<adversarial red>"][0], run.conds["red"][0] + attacks[-1])


def test_an_adversarial_erasure_is_reproducible_and_differs_from_the_plain_one(tiny_folders):
    host = host_for(tiny_folders["sd1"])
    config = dict(concept="red", iterations=3, lr=1e-3, sample_steps=4, adversarial_every=1, adversarial_steps=2)
    first = train_erasure(host, EraseConfig(**config, adversarial=True)).detached()
    second = train_erasure(host, EraseConfig(**config, adversarial=True)).detached()
    plain = train_erasure(host, EraseConfig(**config)).detached()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], plain[name]) for name in first)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_on_a_model_without_a_judge_the_attack_writes_the_token_and_a_grid_to_look_at(tiny_folders, tmp_path, family):
    delta = tmp_path / "erasure.safetensors"
    model = ["--model", tiny_folders[family]]
    assert main(["erase", *model, "--concept", "red", "--iterations", "1", "--sample-steps", "4", "--out", str(delta)]) == 0
    out = tmp_path / "attack"
    assert main(["attack", *model, "--delta", str(delta), "--concept", "red", "--steps", "2", "--images", "2", "--n", "2", "--out-dir", str(out)]) == 0
    token = load_file(out / "attack-erasure-token.safetensors")
    widths = {name: tensor.shape for name, tensor in token.items()}
    assert widths == ({"emb_params": (1, 32)} if family == "sd1" else {"clip_l": (1, 32), "clip_g": (1, 32)})
    grid = Image.open(out / "attack-erasure-grid.png")
    pipeline = load_pipeline(tiny_folders[family])
    image_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    assert grid.height == 4 * image_size  # four rows: base and erased model, concept and token
    assert not (out / "attack-erasure.json").exists()
