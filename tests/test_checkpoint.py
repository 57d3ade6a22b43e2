"""Weights: official TS2-Net state dicts, our own checkpoint format, local CLIP files, and missing weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import TINY_CLIP, random_video, tiny_net

from ts2cli.errors import CheckpointError, LibraryError, WeightsNotFoundError
from ts2cli.model import ModelOptions, load_model, save_checkpoint
from ts2cli.model.checkpoint import read_checkpoint

OUR_TO_OFFICIAL = (
    ("temporal.position.", "frame_position_embeddings."),
    ("temporal.blocks.", "transformerClip.resblocks."),
    ("selector.predictor.", "visual_token_selector.score_predictor."),
)


def official_state_dict(net) -> dict[str, torch.Tensor]:
    """The reference's layout: CLIP matrices in fp16, `attn.net.` in the shifted blocks, unused modules present."""
    blocks = len(net.clip.visual.transformer.resblocks)
    shifted = {f"clip.visual.transformer.resblocks.{i}.attn." for i in range(blocks - 2, blocks)}
    state = {}
    for key, tensor in net.state_dict().items():
        for ours, theirs in OUR_TO_OFFICIAL:
            key = key.replace(ours, theirs)
        for prefix in shifted:
            key = key.replace(prefix, prefix + "net.")
        matrix = key.startswith("clip.") and tensor.ndim >= 2 and "embedding" not in key
        state[key] = tensor.half() if matrix else tensor.clone()
    state["visual_prompt_encoder.conv1.weight"] = torch.zeros(3, 3)
    state["text_token_selector.score_predictor.in_conv.1.bias"] = torch.zeros(3)
    return state


def rounded_like_official(net):
    """The same model with its CLIP matrices rounded through fp16, as the official file stores them."""
    state = {
        k: v.half().float() if k.startswith("clip.") and v.ndim >= 2 and "embedding" not in k else v
        for k, v in net.state_dict().items()
    }
    net.load_state_dict(state)
    return net


@pytest.mark.parametrize("compat", ["fixed", "official"])
def test_official_checkpoint_loads_and_gives_identical_outputs(tmp_path, compat):
    reference = rounded_like_official(tiny_net(compat=compat))
    path = tmp_path / "pytorch_model.bin.4"
    torch.save(official_state_dict(reference), path)

    loaded = load_model(ModelOptions(checkpoint=path, compat=compat, device="cpu"))
    assert loaded.config.zero_shot is False and loaded.identity["mode"] == "ts2net"
    assert loaded.config.compat == compat
    assert load_model(ModelOptions(checkpoint=path, device="cpu")).config.compat == "official"  # trained so
    net = loaded.net
    net.selector.samples = reference.selector.samples = 50
    for key, tensor in reference.state_dict().items():
        assert torch.equal(net.state_dict()[key], tensor), key
    videos, mask = random_video(2, seed=2), torch.ones(2, 12, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected, _ = reference.encode_video(videos, mask)
        got, _ = net.encode_video(videos, mask)
    assert torch.equal(got, expected)


def test_official_checkpoint_with_unknown_keys_is_refused_with_their_names(tmp_path):
    state = official_state_dict(tiny_net())
    state["mystery.weight"] = torch.zeros(2)
    path = tmp_path / "pytorch_model.bin.0"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"mystery\.weight"):
        read_checkpoint(path)


def test_checkpoint_that_does_not_fit_lists_the_keys(tmp_path):
    state = official_state_dict(tiny_net())
    del state["transformerClip.resblocks.0.ln_1.weight"]
    state["transformerClip.resblocks.0.mlp.c_fc.weight"] = torch.zeros(5, 5)
    path = tmp_path / "pytorch_model.bin.0"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(ModelOptions(checkpoint=path, device="cpu"))
    message = str(error.value)
    assert "temporal.blocks.0.ln_1.weight" in message and "temporal.blocks.0.mlp.c_fc.weight" in message
    assert "\n" not in message


def test_own_format_round_trips_bit_exactly(tmp_path):
    net = tiny_net(seed=3)
    path = tmp_path / "model.safetensors"
    config = dataclasses.replace(net.config, provenance={"data": "unit test", "epochs": 0})
    save_checkpoint(net, path, config)
    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777  # readable as any file the user makes
    loaded = load_model(ModelOptions(checkpoint=path, device="cpu"))
    assert loaded.config == config and loaded.config.provenance == {"data": "unit test", "epochs": 0}
    state = loaded.net.state_dict()
    assert state.keys() == net.state_dict().keys()
    for key, tensor in net.state_dict().items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    videos, mask = random_video(1, seed=4), torch.ones(1, 12, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(loaded.net.encode_video(videos, mask)[0], net.encode_video(videos, mask)[0])


def test_a_checkpoint_brings_its_own_compat_and_frames_unless_asked_otherwise(tmp_path):
    net = tiny_net(seed=3)
    path = tmp_path / "official-4.safetensors"
    save_checkpoint(net, path, dataclasses.replace(net.config, compat="official", frames=4))
    own = load_model(ModelOptions(checkpoint=path, device="cpu"))
    assert (own.config.compat, own.config.frames) == ("official", 4)
    assert (own.identity["compat"], own.identity["frames"]) == ("official", 4)
    assert (own.identity["source"]["compat"], own.identity["source"]["frames"]) == ("official", 4)
    # what the checkpoint is, not the command line's defaults for CLIP weights it did not use
    assert (own.identity["source"]["model"], own.identity["source"]["pretrained"]) == (net.config.backbone, None)
    asked = load_model(ModelOptions(checkpoint=path, device="cpu", compat="fixed", frames=6))
    assert (asked.config.compat, asked.config.frames) == ("fixed", 6)
    clip_only = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu"))
    assert (clip_only.config.compat, clip_only.config.frames) == ("fixed", 12)


def test_text_only_loading_gives_the_same_text_features(tmp_path):
    net = tiny_net(seed=5)
    path = tmp_path / "model.safetensors"
    save_checkpoint(net, path, net.config)
    full = load_model(ModelOptions(checkpoint=path, device="cpu"))
    text_only = load_model(ModelOptions(checkpoint=path, device="cpu"), text_only=True)
    assert text_only.net.clip.visual is None and text_only.net.selector is None
    queries = ["a red square moving left", "a dog"]
    assert (full.encode_texts(queries)[0] == text_only.encode_texts(queries)[0]).all()


def test_local_clip_weights_file_gives_a_zero_shot_model(tmp_path):
    net = tiny_net(zero_shot=True, seed=6)
    path = tmp_path / "clip-weights.pt"
    torch.save({k.removeprefix("clip."): v.half() for k, v in net.state_dict().items()}, path)
    loaded = load_model(ModelOptions(pretrained=str(path), backbone_cfg=TINY_CLIP, device="cpu"))
    assert loaded.config.zero_shot and loaded.identity["mode"] == "zero-shot"
    assert loaded.identity["clip_weights"].startswith("clip-weights.pt#")
    assert loaded.net.clip.visual.conv1.weight.dtype == torch.float32  # fp16 files are cast on load


def test_missing_weights_file_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(WeightsNotFoundError) as error:
        load_model(ModelOptions(pretrained=str(tmp_path / "nope.pt"), backbone_cfg=TINY_CLIP, device="cpu"))
    assert "--pretrained" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="--checkpoint"):
        load_model(ModelOptions(checkpoint=tmp_path / "nope.safetensors", device="cpu"))


def test_text_only_loading_imports_neither_open_clip_nor_the_compiler(tmp_path):
    """Cold `ts2 search` speed depends on this: open_clip's package import pulls torchvision and torch._dynamo."""
    import subprocess
    import sys

    net = tiny_net(seed=5)
    path = tmp_path / "model.safetensors"
    save_checkpoint(net, path, net.config)
    code = (
        "import sys\n"
        "from ts2cli.model import ModelOptions, load_model\n"
        f"model = load_model(ModelOptions(checkpoint={str(path)!r}, device='cpu'), text_only=True)\n"
        "model.encode_texts(['a dog'])\n"
        "print(sorted(m for m in ('open_clip', 'torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_checkpoint_without_ts2net_parts_is_described_as_fine_tuned_clip(tmp_path):
    from ts2cli.report import describe_model

    net = tiny_net(seed=3, zero_shot=True)  # what `ts2 train --head meanpool` saves
    path = tmp_path / "meanpool.safetensors"
    save_checkpoint(net, path, net.config)
    report = describe_model(load_model(ModelOptions(checkpoint=path, device="cpu")))
    assert report["mode"] == "zero-shot" and report["note"].startswith("fine-tuned CLIP without TS2-Net parts")
    clip_only = describe_model(load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu")))
    assert clip_only["note"].startswith("zero-shot: CLIP frame features")


def test_a_weights_file_is_the_same_model_by_its_whole_content(tmp_path):
    from safetensors.torch import save_file

    from ts2cli.scan import fingerprint
    from ts2cli.store import Library

    state = {k.removeprefix("clip."): v.contiguous() for k, v in tiny_net(zero_shot=True).state_dict().items()}
    weights = tmp_path / "clip.safetensors"
    save_file(state, str(weights))
    options = ModelOptions(model="tiny", backbone_cfg=TINY_CLIP, pretrained=str(weights), device="cpu")
    identity = load_model(options, text_only=True).identity
    # a fine-tuned copy of the same size whose change falls outside the chunks a sampled fingerprint reads
    content = bytearray(weights.read_bytes())
    assert len(content) > 3 * 64 * 1024
    content[len(content) // 4] ^= 1
    tuned = tmp_path / "tuned.safetensors"
    tuned.write_bytes(bytes(content))
    assert fingerprint(tuned) == fingerprint(weights)
    tuned_identity = load_model(dataclasses.replace(options, pretrained=str(tuned)), text_only=True).identity

    # a library written before whole-file digests records the sampled fingerprint: it goes on working, and from
    # then on records the digest, against which the tuned copy is another model
    recorded = {**identity, "clip_weights": f"clip.safetensors#{fingerprint(weights)[:16]}"}
    with Library.open(tmp_path / "library", write=True, create=True) as library:
        library.check_model(recorded)
        library.check_model(identity)
        assert library.model_config() == identity
        with pytest.raises(LibraryError, match="built with model"):
            library.check_model(tuned_identity)


def test_an_unknown_model_name_suggests_clip_vits_that_load():
    from ts2cli.errors import Ts2Error
    from ts2cli.model.backbone import base_model_config

    for mistyped, suggested in (("vit-b-32", "ViT-B-32"), ("NotAModel", "ViT-B-32")):
        with pytest.raises(Ts2Error, match="Unknown --model") as raised:
            base_model_config(mistyped)
        names = str(raised.value).split("such as ")[1].split(", or")[0].split(", ")
        assert suggested in names
        for name in names:
            base_model_config(name)  # each one is a plain CLIP ViT that TS2-Net accepts
    for not_a_vit in ("ViT-B-16-SigLIP", "RN50"):
        with pytest.raises(Ts2Error, match="not a plain CLIP ViT"):
            base_model_config(not_a_vit)


def test_a_resnet_config_file_is_refused_in_one_line():
    from ts2cli.errors import Ts2Error

    resnet = {**TINY_CLIP, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}}
    with pytest.raises(Ts2Error, match="needs a CLIP ViT backbone with a class token"):
        load_model(ModelOptions(pretrained=None, backbone_cfg=resnet, device="cpu"))


def test_more_frames_than_the_temporal_transformer_has_positions_for_is_refused_up_front(tmp_path):
    from ts2cli.errors import Ts2Error

    too_many = pytest.raises(Ts2Error, match=r"--frames 20 is more than TS2-Net takes.*--frames 19 or less")
    with too_many:
        load_model(
            ModelOptions(model="tiny", backbone_cfg=TINY_CLIP, pretrained=None, device="cpu", frames=20), trainable=True
        )
    path = tmp_path / "trained.safetensors"
    save_checkpoint(tiny_net(), path, tiny_net().config)
    with too_many:
        load_model(ModelOptions(checkpoint=path, device="cpu", frames=20))
    assert load_model(ModelOptions(checkpoint=path, device="cpu", frames=19)).config.frames == 19
    # without a temporal transformer (zero-shot), any number of frames is fine
    assert (
        load_model(
            ModelOptions(model="tiny", backbone_cfg=TINY_CLIP, pretrained=None, device="cpu", frames=40)
        ).config.frames
        == 40
    )


def test_a_folder_given_as_checkpoint_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; --checkpoint takes a file"):
        read_checkpoint(tmp_path)


def test_a_model_recorded_before_the_topk_choice_keeps_the_topk_it_ran_with(tmp_path):
    """Until the inference top-k was an option, fixed mode ran the hard one: a library indexed then records no
    "topk", and its vectors must go on being made with the hard top-k, not mixed with perturbed ones."""
    from ts2cli.model.loading import options_from_source
    from ts2cli.model_record import MODEL_SOURCE_KEY, same_model

    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_net(), checkpoint, dataclasses.replace(tiny_net().config))
    loaded = {
        topk: load_model(ModelOptions(checkpoint=checkpoint, device="cpu", topk=topk)) for topk in ("perturbed", "hard")
    }
    assert load_model(ModelOptions(checkpoint=checkpoint, device="cpu")).identity["topk"] == "perturbed"
    old = {k: v for k, v in loaded["hard"].identity.items() if k != "topk"}
    old[MODEL_SOURCE_KEY] = {k: v for k, v in old[MODEL_SOURCE_KEY].items() if k != "topk"}
    assert same_model(old, loaded["hard"].identity) and not same_model(old, loaded["perturbed"].identity)
    again = load_model(options_from_source(old[MODEL_SOURCE_KEY], "cpu"))
    assert again.config.inference_topk == "hard" and same_model(again.identity, old)
    official = {**old, "compat": "official"}
    assert same_model(official, {**loaded["perturbed"].identity, "compat": "official"})
    zero_shot = load_model(ModelOptions(pretrained=None, backbone_cfg=TINY_CLIP, device="cpu")).identity
    assert "topk" not in zero_shot  # selects no tokens: its records are unchanged
