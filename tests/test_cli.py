"""The command line end to end on tiny pipelines, and every bad input: a clear error and nothing written."""

import os

import pytest
import torch
from safetensors.torch import save_file

from esd_core.cli import main
from esd_core.diffusers_host import DiffusersHost, load_pipeline
from esd_core.erasure_file import ErasureDelta
from esd_core.keys import diffusers_to_ldm_names
from esd_core.output_paths import check_output_file

QUICK = ["--iterations", "2", "--lr", "1e-3", "--sample-steps", "4", "--device", "cpu"]


def run_erase(folder, out, *extra):
    return main(["erase", "--model", folder, "--concept", "red", "--out", str(out), *QUICK, *extra])


def files_in(folder):
    return sorted(os.listdir(folder))


def test_erase_info_apply_round_trip(tiny_folders, tmp_path, capsys):
    delta_path = tmp_path / "red.safetensors"
    assert run_erase(tiny_folders["sd1"], delta_path, "--method", "xattn", "--save-dtype", "fp32", "--save-format", "delta") == 0
    delta = ErasureDelta.load(str(delta_path))
    for key in ("concept", "erase_from", "method", "iterations", "lr", "eta", "sample_steps", "sample_guidance",
                "sample_with", "seed", "base_family", "base_fingerprint", "created", "package_version", "format_version"):
        assert key in delta.metadata, key
    assert delta.metadata["method"] == "esd-x" and delta.metadata["iterations"] == "2"

    assert main(["info", str(delta_path)]) == 0
    printed = capsys.readouterr().out
    assert '"concept": "red"' in printed and "tensors" in printed

    out_folder = tmp_path / "erased"
    assert main(["apply", "--model", tiny_folders["sd1"], "--delta", str(delta_path), "--out", str(out_folder), "--device", "cpu"]) == 0
    base, erased = load_pipeline(tiny_folders["sd1"]).unet, load_pipeline(str(out_folder)).unet
    mapping = diffusers_to_ldm_names(base.state_dict().keys(), dict(base.config))
    for name, tensor in base.state_dict().items():
        change = delta.deltas.get(mapping[name])
        expected = tensor if change is None else tensor + change
        assert torch.allclose(erased.state_dict()[name], expected, atol=1e-7), name

    unet_file = tmp_path / "unet.safetensors"
    assert main(["apply", "--model", tiny_folders["sd1"], "--delta", str(delta_path), "--strength", "0", "--out", str(unet_file)]) == 0
    from safetensors.torch import load_file

    written = load_file(str(unet_file))
    assert all(torch.equal(written[name], tensor) for name, tensor in base.state_dict().items())


def test_single_file_checkpoint_with_config_folder(tiny_folders, tmp_path):
    """A CompVis-style single file (model.diffusion_model.*, cond_stage_model.*) loads via diffusers' single-file code."""
    pipeline = load_pipeline(tiny_folders["sd1"])
    unet_state = pipeline.unet.state_dict()
    mapping = diffusers_to_ldm_names(unet_state.keys(), dict(pipeline.unet.config))
    checkpoint = {f"model.diffusion_model.{mapping[name]}": t for name, t in unet_state.items()}
    checkpoint.update({f"cond_stage_model.transformer.text_model.{name}": t for name, t in pipeline.text_encoder.state_dict().items()})
    single = tmp_path / "model.safetensors"
    save_file(checkpoint, str(single))

    loaded = load_pipeline(str(single), config=tiny_folders["sd1"], with_vae=False)
    assert all(torch.equal(loaded.unet.state_dict()[n], t) for n, t in unet_state.items())
    assert run_erase(str(single), tmp_path / "d.safetensors", "--config", tiny_folders["sd1"]) == 0

    assert run_erase(str(single), tmp_path / "e.safetensors") == 2
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--concept", "  "], "concept is empty"),
        (["--iterations", "0"], "iterations must be a whole number from 1 to 100000"),
        (["--lr", "-1"], "lr must be a finite number from 1e-09 to 1.0"),
        (["--erase-from", "a, b"], "erase_from lists 2 texts for 1 concepts"),
    ],
)
def test_bad_erase_arguments(tiny_folders, tmp_path, capsys, arguments, message):
    assert run_erase(tiny_folders["sd1"], tmp_path / "x.safetensors", *arguments) == 2
    assert message in capsys.readouterr().err
    assert files_in(tmp_path) == []


def test_unknown_method_lists_the_valid_ones(tiny_folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_erase(tiny_folders["sd1"], tmp_path / "x.safetensors", "--method", "bogus")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in error and "esd-x-strict" in error and "noxattn" in error
    assert files_in(tmp_path) == []


def test_missing_or_unreadable_model(tiny_folders, tmp_path, capsys):
    assert run_erase(str(tmp_path / "nowhere"), tmp_path / "x.safetensors") == 2
    assert "No model at" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert run_erase(str(junk), tmp_path / "x.safetensors", "--config", str(tmp_path)) == 2
    assert "is not a diffusers model folder (it has no model_index.json)" in capsys.readouterr().err
    assert run_erase(str(junk), tmp_path / "x.safetensors", "--config", tiny_folders["sd1"]) == 2
    assert "Could not load the checkpoint" in capsys.readouterr().err
    assert files_in(tmp_path) == ["junk.safetensors"]


def test_long_concept_warns_what_was_cut(tiny_folders):
    host = DiffusersHost(load_pipeline(tiny_folders["sd1"]))
    with pytest.warns(UserWarning, match=r"longer than the text encoder's 16 tokens; this part is ignored: 'lm'"):
        host.encode("a red circle on palm")


def test_non_finite_loss_stops_and_writes_nothing(tiny_folders, tmp_path, capsys, monkeypatch):
    import esd_core.esd as esd

    def overflowing_target(*args):  # what a diverging erasure reaches: targets beyond float range
        return esd_target(*args) * float("inf")

    esd_target = esd.esd_target
    monkeypatch.setattr(esd, "esd_target", overflowing_target)
    out = tmp_path / "x.safetensors"
    code = main(["erase", "--model", tiny_folders["sd1"], "--concept", "red", "--out", str(out),
                 "--iterations", "5", "--sample-steps", "2"])
    assert code == 2
    error = capsys.readouterr().err
    assert "The loss became inf at iteration 1" in error and "nothing was saved" in error
    assert files_in(tmp_path) == []


def test_ctrl_c_leaves_no_file(tiny_folders, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(self, *args)

    original = DiffusersHost.predict
    monkeypatch.setattr(DiffusersHost, "predict", interrupted)
    assert run_erase(tiny_folders["sd1"], tmp_path / "x.safetensors") == 130
    assert "nothing was written" in capsys.readouterr().err
    assert files_in(tmp_path) == []


def test_delta_for_another_model_is_refused(tiny_folders, tmp_path, capsys):
    delta_path = tmp_path / "sd1.safetensors"
    assert run_erase(tiny_folders["sd1"], delta_path, "--save-format", "delta") == 0
    out = tmp_path / "out"
    assert main(["apply", "--model", tiny_folders["sdxl"], "--delta", str(delta_path), "--out", str(out)]) == 2
    assert "trained on a custom(context_dim=32) model and cannot be applied to a custom-xl(context_dim=64)" in capsys.readouterr().err

    delta = ErasureDelta.load(str(delta_path))
    first = sorted(delta.deltas)[0]
    delta.deltas[first] = torch.zeros(3, 3)
    reshaped = tmp_path / "reshaped.safetensors"
    delta.save(str(reshaped))
    assert main(["apply", "--model", tiny_folders["sd1"], "--delta", str(reshaped), "--out", str(out)]) == 2
    assert f"Shape mismatch at '{first}'" in capsys.readouterr().err
    assert sorted(files_in(tmp_path)) == ["reshaped.safetensors", "sd1.safetensors"]


def test_not_a_delta_file(tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("nope")
    assert main(["info", str(bogus)]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


def test_existing_out_is_refused_before_training_unless_overwrite(tiny_folders, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "red.safetensors"
    existing.write_bytes(b"keep me")
    monkeypatch.setattr("esd_core.cli.train_with_progress", lambda *a: pytest.fail("trained before refusing --out"))
    assert run_erase(tiny_folders["sd1"], existing) == 2
    assert "already exists; choose a new path, or add --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    monkeypatch.undo()
    assert run_erase(tiny_folders["sd1"], existing, "--overwrite") == 0
    assert ErasureDelta.load(str(existing)).metadata["concept"] == "red"


def test_a_file_of_the_input_model_is_never_replaced(tiny_folders, tmp_path, capsys):
    weights = os.path.join(tiny_folders["sd1"], "unet", "diffusion_pytorch_model.safetensors")
    before = open(weights, "rb").read()
    assert run_erase(tiny_folders["sd1"], weights, "--overwrite") == 2
    assert "is a file of the input" in capsys.readouterr().err
    assert open(weights, "rb").read() == before


@pytest.mark.parametrize("case", ["folder", "under a file"])
def test_unwritable_out_is_refused_before_training(tiny_folders, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("esd_core.cli.train_with_progress", lambda *a: pytest.fail("trained before refusing --out"))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.safetensors").mkdir()
    out = tmp_path / ("a_folder.safetensors" if case == "folder" else "a_file/sub/x.safetensors")
    assert run_erase(tiny_folders["sd1"], out) == 2
    assert ("is a folder; give the path of a file in it" if case == "folder" else "is not a folder, so none can be made there") in capsys.readouterr().err


def test_written_files_are_readable_by_others(tiny_folders, tmp_path):
    previous = os.umask(0o022)
    try:
        assert run_erase(tiny_folders["sd1"], tmp_path / "red.safetensors") == 0
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "red.safetensors").st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["nan", "inf", "empty tensor", "no tensors", "model weights"])
def test_damaged_or_foreign_delta_files_are_refused(tmp_path, capsys, damage):
    path = tmp_path / "d.safetensors"
    tensors = {
        "nan": {"diffusion_model.out.2.diff": torch.tensor([1.0, float("nan")])},
        "inf": {"diffusion_model.out.2.diff": torch.tensor([float("-inf")])},
        "empty tensor": {"diffusion_model.out.2.diff": torch.zeros(0)},
        "no tensors": {},
        "model weights": {"conv_in.weight": torch.zeros(2)},
    }[damage]
    save_file(tensors, str(path), metadata={"concept": "red"})
    assert main(["info", str(path)]) == 2
    printed, error = capsys.readouterr()
    if damage != "model weights":  # info shows what a damaged delta file holds before saying what is wrong
        assert '"concept": "red"' in printed
        assert {"nan": "|delta| max nan", "inf": "|delta| max inf", "empty tensor": "empty", "no tensors": "0 tensors"}[damage] in printed
    damaged = "is damaged: its delta for 'out.2.weight' is empty or not finite"
    assert {"nan": damaged, "inf": damaged, "empty tensor": damaged, "no tensors": "holds no deltas",
            "model weights": "in a format this tool does not read (key 'conv_in.weight')"}[damage] in error


def test_eval_refuses_a_delta_for_another_model_before_drawing_images(tiny_folders, tmp_path, capsys, monkeypatch):
    delta_path = tmp_path / "sd1.safetensors"
    assert run_erase(tiny_folders["sd1"], delta_path) == 0
    monkeypatch.setattr("esd_core.tinyworld.evaluate.run_groups", lambda *a: pytest.fail("drew images before refusing the delta"))
    assert main(["eval", "--delta", str(delta_path), "--concept", "circle", "--n", "1"]) == 2
    assert "cannot be applied" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["eval", "--concept", "circle", "--n", "0"], "'0' is not a whole number of at least 1"),
    (["eval", "--concept", "circle", "--strength", "nan"], "'nan' is not a finite number"),
    (["apply", "--delta", "d.safetensors", "--out", "o", "--strength", "inf"], "'inf' is not a finite number"),
    (["bench", "--tiny-world", "--iterations", "0"], "'0' is not a whole number of at least 1"),
])
def test_bad_numbers_are_refused_by_the_parser(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(arguments)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_a_concept_the_tokenizer_does_not_know_is_refused(tmp_path, capsys):
    assert main(["erase", "--concept", "猫 ÄÖ", "--iterations", "1", "--device", "cpu", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "knows no word of '猫 ÄÖ', so it would read it as the empty prompt" in capsys.readouterr().err
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("arguments, message", [
    (["bench"], "Nothing to measure"),
    (["erase", "--concept", "red", "--resolution", "7"], "The resolution must be a positive multiple of"),
    (["erase", "--concept", "red", "--config", "FOLDER"], "--config is only for a single-file checkpoint"),
    (["erase", "--concept", "red", "--seed", str(2**64)], "seed must be a whole number from 0 to 18446744073709551615"),
    (["erase", "--concept", "red", "--sample-steps", "1000"], "sample_steps must be a whole number from 1 to 999, got 1000"),
    (["eval", "--concept", "circle", "--n", "2", "--seed", str(2**64 - 1)], "seed must be from 0 to 18446744073709551614"),
    (["eval", "--concept", "circle, cube"], "unknown concept 'cube'; known: ['circle', 'square'"),
])
def test_bad_options_get_one_line(tiny_folders, tmp_path, capsys, arguments, message):
    arguments = [tiny_folders["sd1"] if a == "FOLDER" else a for a in arguments]
    if arguments[0] == "erase":
        arguments = ["erase", "--model", tiny_folders["sd1"], "--out", str(tmp_path / "x.safetensors"), *QUICK, *arguments[1:]]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    assert files_in(tmp_path) == []


def test_apply_makes_missing_parent_folders_with_the_usual_permissions(tiny_folders, tmp_path):
    delta_path = tmp_path / "red.safetensors"
    assert run_erase(tiny_folders["sd1"], delta_path) == 0
    out = tmp_path / "new" / "sub" / "model"
    previous = os.umask(0o022)
    try:
        assert main(["apply", "--model", tiny_folders["sd1"], "--delta", str(delta_path), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert "model_index.json" in files_in(out) and files_in(out.parent) == ["model"]


def test_a_model_file_reached_through_links_is_protected(tmp_path):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_bytes(b"weights")
    snapshot = tmp_path / "snapshots" / "1"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "w.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    (tmp_path / "model").symlink_to(snapshot)
    for out, model in ((snapshot / "unet" / "w.safetensors", snapshot), (tmp_path / "model" / "unet" / "w.safetensors", tmp_path / "model")):
        with pytest.raises(ValueError, match="is a file of the input"):
            check_output_file(str(out), "--out", ".safetensors", overwrite=True, protected=(str(model),))


def test_eval_never_writes_over_its_delta(tiny_folders, tmp_path, capsys, monkeypatch):
    delta_path = tmp_path / "red.safetensors"
    assert run_erase(tiny_folders["sd1"], delta_path) == 0
    monkeypatch.setattr("esd_core.tinyworld.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated before refusing --json"))
    assert main(["eval", "--delta", str(delta_path), "--concept", "circle", "--json", str(delta_path)]) == 2
    assert "is a file of the input" in capsys.readouterr().err
    assert ErasureDelta.load(str(delta_path)).metadata["concept"] == "red"
