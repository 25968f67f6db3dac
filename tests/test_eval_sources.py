"""`evaluate` on every kind of image source, the errors that name their culprit, provenance, determinism, and
the CLI end to end; all on tiny random-weight networks (test_metrics_tiny_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from onestep_cli.eval.evaluate import evaluate
from onestep_cli.eval import MetricError
from onestep_cli.eval.weights import MissingWeightsError
from onestep_cli.sample_io import SourceError, to_uint8_images, write_samples
from test_metrics_tiny_models import random_images

SEEDS = list(range(6))
IMAGE_METRICS = ["fid", "kid", "is", "fd_clip", "aesthetic"]


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "onestep-home"))


def write_folder(folder: Path, images: np.ndarray, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / (names[i] if names else f"{i:04d}.png"))
    return folder


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A run directory whose generator (a tiny EDM SongUNet copy of a tiny teacher) makes 8x8 RGB images."""
    from onestep_cli.config import validate_config
    from onestep_cli.denoisers.edm import build_precond, save_edm_weights
    from onestep_cli.runs.networks import build_networks
    from onestep_cli.runs.run_dir import RunDir

    root = tmp_path_factory.mktemp("image-run")
    torch.manual_seed(0)
    teacher = build_precond("EDMPrecond", dict(img_resolution=8, img_channels=3, model_type="SongUNet",
                                               model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                               attn_resolutions=[4]))
    save_edm_weights(teacher, root / "teacher")
    config = validate_config({"teacher": {"kind": "edm", "path": str(root / "teacher")}})
    run = RunDir(root / "run")
    run.prepare(config)
    run.export.mkdir()
    generator = build_networks(config).generator
    with torch.no_grad():  # Move the generator away from the teacher so that its images are not the teacher's.
        for parameter in generator.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(run.export / "generator.safetensors"))
    return run.path


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("reference"), random_images(8, 8, 8, seed=3))


def generated(run: Path, seeds=SEEDS) -> torch.Tensor:
    from onestep_cli.runs.loading import load_generator_source
    from onestep_cli.sampling import generate

    loaded = load_generator_source(run)
    return generate(loaded.generator, seeds, loaded.data_shape, loaded.label_dim)


@pytest.fixture(scope="module")
def in_memory(image_run, reference_folder, tiny_weights) -> dict:
    return evaluate(image_run, IMAGE_METRICS, seeds=SEEDS, ref=str(reference_folder), weights=tiny_weights,
                    device="cpu", batch_size=4)


def test_folder_npz_and_in_memory_generator_give_identical_numbers(tmp_path, image_run, reference_folder,
                                                                   tiny_weights, in_memory):
    common = dict(ref=str(reference_folder), weights=tiny_weights, device="cpu", batch_size=4)
    samples = generated(image_run)
    write_samples(samples, SEEDS, tmp_path / "png", {"source": str(image_run)})
    np.savez(tmp_path / "float.npz", samples=samples.numpy())
    np.savez(tmp_path / "edm.npz", samples=to_uint8_images(samples))  # EDM's layout: uint8 [N, H, W, C].
    for stored in (tmp_path / "png", tmp_path / "float.npz", tmp_path / "edm.npz"):
        result = evaluate(stored, IMAGE_METRICS, **common)
        assert result["metrics"] == in_memory["metrics"], stored
        if stored.name == "png":
            assert result["provenance"]["fid"]["seeds"] == "0-5"  # Read from the file names of `onestep sample`.
    assert in_memory["provenance"]["common"]["source_kind"] == "generator"


def test_same_seeds_same_numbers_and_seed_subsets_reproduce(image_run, reference_folder, tiny_weights, in_memory):
    from onestep_cli.runs.loading import load_generator_source
    from onestep_cli.sampling import generator_source

    common = dict(seeds=SEEDS, ref=str(reference_folder), weights=tiny_weights, device="cpu")
    assert evaluate(image_run, IMAGE_METRICS, batch_size=4, **common)["metrics"] == in_memory["metrics"]
    # Another batch size only changes float rounding inside the networks.
    assert evaluate(image_run, ["fid"], batch_size=3, **common)["metrics"]["fid"] == pytest.approx(
        in_memory["metrics"]["fid"], rel=1e-5)
    loaded = load_generator_source(image_run)
    source = lambda seeds: generator_source(loaded.generator, seeds, loaded.data_shape, batch_size=4)
    everything = next(source(SEEDS).batches(6))[1]
    np.testing.assert_array_equal(next(source([2, 3]).batches(2))[1], everything[2:4])


def test_provenance_of_every_number(in_memory):
    for name in IMAGE_METRICS:
        prov = in_memory["provenance"][name]
        for key in ("metric", "backend", "num_samples", "seeds", "weights", "image_size"):
            assert key in prov, (name, key)
        assert prov["num_samples"] == 6 and prov["seeds"] == "0-5" and prov["image_size"] == "8x8"
    fid = in_memory["provenance"]["fid"]
    assert fid["mode"] == "edm" and "TensorFlow-1 bilinear" in fid["resize"]
    assert len(fid["reference_stats_sha256"]) == 64 and len(fid["weights"]["sha256"]["default_1.pt"]) == 64
    assert "6 samples (EDM reports 50k" in fid["protocol"]
    assert in_memory["provenance"]["aesthetic"]["head_weights"]["origin"] == "user path"


def test_clean_mode_equals_clean_fids_compute_fid_with_the_same_network(tmp_path, tiny_weights):
    from cleanfid import fid as cleanfid

    a = write_folder(tmp_path / "a", random_images(10, 20, 20, seed=5))
    b = write_folder(tmp_path / "b", random_images(10, 20, 20, seed=6) // 2)
    net = torch.jit.load(tiny_weights["inception"])
    expected = cleanfid.compute_fid(str(a), str(b), mode="clean", custom_feat_extractor=lambda x: net((x - 128) / 128),
                                    num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    ours = evaluate(a, ["fid"], ref=str(b), fid_mode="clean", weights=tiny_weights, device="cpu")
    assert ours["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)
    assert "clean-fid" in ours["provenance"]["fid"]["backend"] and ours["provenance"]["fid"]["mode"] == "clean"


def test_saved_statistics_as_reference_give_the_same_numbers(tmp_path, image_run, reference_folder, tiny_weights,
                                                            in_memory):
    common = dict(weights=tiny_weights, device="cpu", batch_size=4)
    stats = evaluate(reference_folder, ["fid", "kid", "fd_clip"], save_stats=tmp_path / "ref.npz", **common)
    assert stats["metrics"] == {} and stats["skipped_without_reference"] == ["fid", "kid", "fd_clip"]
    with np.load(tmp_path / "ref.npz") as data:
        assert {"mu", "sigma", "clip_mu", "clip_sigma", "inception_features", "onestep_meta"} <= set(data.files)
        assert json.loads(str(data["onestep_meta"]))["resolution"] == [8, 8]
    from_images = in_memory  # The same samples against the reference images themselves.
    from_stats = evaluate(image_run, ["fid", "kid", "fd_clip"], seeds=SEEDS, ref=str(tmp_path / "ref.npz"), **common)
    assert from_stats["metrics"] == pytest.approx({k: from_images["metrics"][k] for k in ("fid", "kid", "fd_clip")},
                                                  rel=1e-6)
    assert (from_stats["provenance"]["fid"]["reference_stats_sha256"]
            == from_images["provenance"]["fid"]["reference_stats_sha256"])

    # An EDM-format file (bare mu/sigma) is accepted, and what it does not record is said.
    with np.load(tmp_path / "ref.npz") as data:
        np.savez(tmp_path / "edm-ref.npz", mu=data["mu"], sigma=data["sigma"])
    edm = evaluate(image_run, ["fid"], seeds=SEEDS, ref=str(tmp_path / "edm-ref.npz"), **common)
    assert edm["metrics"]["fid"] == pytest.approx(from_images["metrics"]["fid"], rel=1e-6)
    assert "assumed" in edm["provenance"]["fid"]["reference_protocol"]
    with pytest.raises(MetricError, match="Metric 'kid' needs the reference's features"):
        evaluate(image_run, ["kid"], seeds=SEEDS, ref=str(tmp_path / "edm-ref.npz"), **common)
    with pytest.raises(MetricError, match="FID mode 'edm'.*--fid-mode edm"):
        evaluate(image_run, ["fid"], seeds=SEEDS, ref=str(tmp_path / "ref.npz"), fid_mode="clean", **common)


# ---------------------------------------------------------------------------------------------------------------------
# Errors that name their culprit


def test_corrupt_image_is_named(tmp_path, tiny_weights):
    folder = write_folder(tmp_path / "imgs", random_images(3, 8, 8))
    (folder / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(SourceError, match=r"0001\.png is corrupt or unreadable"):
        evaluate(folder, ["aesthetic"], weights=tiny_weights, device="cpu")


def test_truncated_image_is_named(tmp_path, tiny_weights):
    folder = write_folder(tmp_path / "imgs", random_images(3, 32, 32))
    data = (folder / "0002.png").read_bytes()
    (folder / "0002.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"0002\.png is corrupt or unreadable"):
        evaluate(folder, ["aesthetic"], weights=tiny_weights, device="cpu")


def test_mixed_sizes_are_named(tmp_path, tiny_weights):
    folder = write_folder(tmp_path / "imgs", random_images(2, 8, 8))
    write_folder(folder, random_images(1, 16, 12), names=["0005.png"])
    with pytest.raises(SourceError, match=r"mixes image sizes: 0000\.png is 8x8 but 0005\.png is 12x16"):
        evaluate(folder, ["aesthetic"], weights=tiny_weights, device="cpu")


def test_empty_folder_is_named(tmp_path, tiny_weights):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="empty holds no image files"):
        evaluate(tmp_path / "empty", ["aesthetic"], weights=tiny_weights, device="cpu")


def test_prompt_count_mismatch_is_named(tmp_path, tiny_weights):
    folder = write_folder(tmp_path / "imgs", random_images(3, 8, 8))
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    with pytest.raises(SourceError, match=r"prompts\.txt holds 2 prompts but .* has 3 images"):
        evaluate(folder, ["clip_score"], prompts=tmp_path / "prompts.txt", weights=tiny_weights, device="cpu")


def test_reference_at_another_resolution_is_refused(tmp_path, image_run, tiny_weights):
    other = write_folder(tmp_path / "ref16", random_images(4, 16, 16))
    with pytest.raises(MetricError, match=r"computed at 16x16 but .* is 8x8"):
        evaluate(image_run, ["fid"], seeds=SEEDS, ref=str(other), weights=tiny_weights, device="cpu")
    evaluate(other, ["fid"], save_stats=tmp_path / "ref16.npz", weights=tiny_weights, device="cpu")
    with pytest.raises(MetricError, match=r"computed at 16x16 but .* is 8x8"):
        evaluate(image_run, ["fid"], seeds=SEEDS, ref=str(tmp_path / "ref16.npz"), weights=tiny_weights, device="cpu")


def test_missing_weights_name_file_source_and_command(tmp_path, image_run):
    with pytest.raises(MissingWeightsError) as info:
        evaluate(image_run, ["aesthetic"], seeds=[0, 1], device="cpu")
    message = str(info.value)
    assert "ViT-L-14.pt" in message and "openaipublic.azureedge.net" in message
    assert "onestep weights fetch clip_vit_l14" in message and "Nothing is downloaded" in message


def test_inception_score_without_a_logits_network_says_why(image_run, tiny_weights):
    weights = {k: v for k, v in tiny_weights.items() if k != "inception_logits"}
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt.*no classifier"):
        evaluate(image_run, ["is"], seeds=[0, 1], weights=weights, device="cpu")


def test_image_metrics_need_a_reference_and_reject_teachers(image_run, tiny_weights):
    with pytest.raises(MetricError, match="compares with a reference; pass --ref"):
        evaluate(image_run, ["fid"], seeds=[0, 1], weights=tiny_weights, device="cpu")
    with pytest.raises(MetricError, match="names a teacher"):
        evaluate(image_run, ["fid"], seeds=[0, 1], ref=str(image_run), weights=tiny_weights, device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.e2e
def test_cli_eval_with_prompts_records_the_pairing(cli, tmp_path, tiny_weights):
    folder = write_folder(tmp_path / "imgs", random_images(3, 16, 16), names=["b.png", "a.png", "c.png"])
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na red car\nthe big dog\n")
    weights = [arg for key in ("clip_vit_l14", "imagereward", "pickscore")
               for arg in ("--weights", f"{key}={tiny_weights[key]}")]
    run = cli.invoke("eval", folder, "--metrics", "clip_score,imagereward,pickscore", "--prompts",
                     tmp_path / "prompts.txt", *weights, "--device", "cpu", "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert set(result["metrics"]) == {"clip_score", "imagereward", "pickscore"}
    pairing = result["provenance"]["imagereward"]["prompt_pairing"]
    assert pairing["first_pair"] == ["a.png", "a photo of a cat"] and pairing["num_prompts"] == 3
    assert "sorted file-name order" in pairing["pairing"]


def test_cli_missing_weights_and_unknown_metric_exit_nonzero(cli, tmp_path):
    folder = write_folder(tmp_path / "imgs", random_images(2, 8, 8))
    missing = cli.invoke("eval", folder, "--metrics", "aesthetic", "--device", "cpu",
                         env={"ONESTEP_HOME": str(tmp_path / "empty-home")})
    assert missing.exit_code == 1 and "onestep weights fetch clip_vit_l14" in " ".join(missing.output.split())
    unknown = cli.invoke("eval", folder, "--metrics", "fd_dino")
    assert unknown.exit_code == 2 and "Did you mean 'fd_dinov2'" in unknown.output


@pytest.mark.slow
def test_compiled_generator_gives_the_same_numbers(image_run, reference_folder, tiny_weights, in_memory):
    """`onestep eval --compile`: the compiled generator's images score as the eager one's (uint8 quantisation may flip
    a rare pixel, hence the tolerance); where torch.compile cannot run it generates eager and says compiled: false."""
    from onestep_cli.runtime.precision import compile_failure

    result = evaluate(image_run, ["fid", "kid"], seeds=SEEDS, ref=str(reference_folder), weights=tiny_weights,
                      device="cpu", batch_size=4, compile_generator=True)
    assert result["provenance"]["common"]["compiled"] == (compile_failure(torch.device("cpu")) is None)
    for name in ("fid", "kid"):
        assert result["metrics"][name] == pytest.approx(in_memory["metrics"][name], rel=1e-3, abs=1e-6)
