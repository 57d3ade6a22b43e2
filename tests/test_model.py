"""TS2-Net parts against the spec's definitions, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_CLIP, random_video, tiny_net

from ts2cli.model.selection import PerturbedTopK, TokenSelector, sorted_topk
from ts2cli.model.similarity import frame_weighted_similarity
from ts2cli.model.temporal import expand_frame_mask
from ts2cli.model.token_shift import shift_index_sets, shift_tokens, shifted_block_forward
from ts2cli.model.visual import encode_frame_tokens

# --- token shift (spec §3.1) -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "forward", "backward"),
    [
        (50, [1, 8, 15, 22, 29, 36, 43], [4, 11, 18, 25, 32, 39, 46]),
        (197, [1, 29, 57, 85, 113, 141, 169], [4, 32, 60, 88, 116, 144, 172]),
    ],
)
def test_shift_index_sets_match_spec_table(length, forward, backward):
    assert shift_index_sets(length) == (forward, backward)


def test_shifted_tokens_come_from_neighbouring_frames():
    frames, length, width = 5, 50, 3
    forward, backward = shift_index_sets(length)
    # token value = frame index * 1000 + token index, so every copied token says where it came from
    source = torch.arange(frames)[:, None] * 1000 + torch.arange(length)[None, :]
    tokens = source[:, :, None].expand(frames, length, width).float().repeat(2, 1, 1)
    shifted = shift_tokens(tokens, frames, forward, backward).view(2, frames, length, width)[..., 0]
    for t in range(frames):
        for j in range(length):
            if j in forward and t > 0:
                expected_frame = t - 1
            elif j in backward and t < frames - 1:
                expected_frame = t + 1
            else:
                expected_frame = t
            assert shifted[1, t, j] == expected_frame * 1000 + j
    assert torch.equal(shifted[:, :, 0], source[None, :, 0].expand(2, frames).float())  # CLS never moves


def test_shift_residual_path_sees_unshifted_input():
    net = tiny_net(zero_shot=False)
    block = net.clip.visual.transformer.resblocks[-1]
    x = torch.randn(2 * 4, 17, 64)
    forward, backward = shift_index_sets(17)
    out = shifted_block_forward(block, x, 4, forward, backward)
    # independent reference: torch's own MultiheadAttention on the shifted normalised input
    shifted = shift_tokens(block.ln_1(x), 4, forward, backward)
    mid = x + block.attn(shifted, shifted, shifted, need_weights=False)[0]
    expected = mid + block.mlp(block.ln_2(mid))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # identical frames: the shift is a no-op and the block equals open_clip's own forward
    same = x[:1].expand(4, -1, -1).contiguous()
    torch.testing.assert_close(shifted_block_forward(block, same, 4, forward, backward), block(same))


def test_visual_tokens_match_open_clip_without_shift():
    net = tiny_net(zero_shot=True)
    pixels = random_video(1, 3)[0]
    tokens = encode_frame_tokens(net.clip.visual, pixels, frames=3, shift_blocks=0)
    assert tokens.shape == (3, 17, 64)
    torch.testing.assert_close(tokens[:, 0], net.clip.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_text_at_32_tokens_matches_open_clip_padded_to_77():
    from ts2cli.model.preprocess import tokenize

    net = tiny_net(zero_shot=True)
    tokens = tokenize(["a dog catching a frisbee", "word " * 40])
    assert tokens.ids.shape == (2, 32) and tokens.truncated == [False, True]
    assert tokens.ids[1, -1].item() == 49407  # EOT forced at the end when truncated
    padded = F.pad(tokens.ids, (0, 77 - 32))
    torch.testing.assert_close(net.encode_text(tokens.ids), net.clip.encode_text(padded), rtol=1e-5, atol=1e-5)


# --- token selection (spec §4) ------------------------------------------------------------------------------------


def test_selection_keeps_cls_and_hard_picks_highest_scores():
    torch.manual_seed(0)
    selector = TokenSelector(64, top_k=3)
    tokens = torch.randn(6, 17, 64)
    out = selector(tokens, hard=True)
    assert out.shape == (6, 4, 64)
    assert torch.equal(out[:, 0], tokens[:, 0])
    scores = selector.predictor(tokens)[:, 1:]
    for n in range(6):
        best = sorted(scores[n].argsort(descending=True)[:3].tolist())
        assert torch.equal(out[n, 1:], tokens[n, 1:][best])  # raster order, highest three


def test_perturbed_topk_is_reproducible_with_a_seed_and_soft():
    tokens = torch.randn(4, 17, 64)
    first = TokenSelector(64, samples=100, seed=7)
    second = TokenSelector(64, samples=100, seed=7)
    second.load_state_dict(first.state_dict())
    a, b = first(tokens, hard=False), second(tokens, hard=False)
    assert torch.equal(a, b)
    first.reseed()
    assert torch.equal(first(tokens, hard=False), a)
    other = TokenSelector(64, samples=100, seed=8)
    other.load_state_dict(first.state_dict())
    assert not torch.equal(other(tokens, hard=False), a)


def test_perturbed_topk_forward_and_diagonal_backward_match_dense_formula():
    scores = torch.randn(3, 10, requires_grad=True)
    noise = torch.randn(3, 40, 10)
    k, sigma = 3, 0.5
    indicator = PerturbedTopK.apply(scores, noise, k, sigma)
    onehot = F.one_hot(sorted_topk(scores.detach()[:, None] + sigma * noise, k), 10).float()  # (N,S,K,P)
    torch.testing.assert_close(indicator, onehot.mean(1))
    upstream = torch.randn(3, k, 10)
    indicator.backward(upstream)
    jacobian = torch.einsum("nskp,nsp->nkp", onehot, noise) / (40 * sigma)
    torch.testing.assert_close(scores.grad, (upstream * jacobian).sum(1))


# --- temporal mask and similarity (spec §5, §6, §10.1) ------------------------------------------------------------


def test_official_and_fixed_mask_expansion_differ_exactly_as_spec_says():
    mask = torch.tensor([[1] * 7 + [0] * 5])
    tile = expand_frame_mask(mask, 4, "official")[0]
    interleave = expand_frame_mask(mask, 4, "fixed")[0]
    assert tile.tolist() == [mask[0, j % 12].item() for j in range(48)]
    assert interleave.tolist() == [mask[0, j // 4].item() for j in range(48)]
    # after the strided pick: official m12 = [m0, m4, m8] × 4, fixed m12 = m
    assert tile[::4].tolist() == [1, 1, 0] * 4
    assert interleave[::4].tolist() == mask[0].tolist()
    full = torch.ones(1, 12, dtype=torch.long)
    assert torch.equal(expand_frame_mask(full, 4, "official"), expand_frame_mask(full, 4, "fixed"))


def direct_similarity(text, frames, mask, temperature=4.0):
    """Spec §6 written out with loops, as an independent reference."""
    scores = torch.zeros(text.shape[0], frames.shape[0])
    weights = torch.zeros(text.shape[0], frames.shape[0], frames.shape[1])
    for t in range(text.shape[0]):
        unit_text = text[t] / text[t].norm()
        for v in range(frames.shape[0]):
            cos = torch.stack([(f / f.norm()) @ unit_text for f in frames[v]])
            valid = mask[v].bool()
            w = cos * valid
            w = w / w.norm()
            logits = torch.where(valid, temperature * w, torch.tensor(-math.inf))
            alpha = torch.softmax(logits, 0)
            weights[t, v] = alpha
            scores[t, v] = (alpha * cos).sum()
    return scores, weights


@pytest.mark.parametrize("eps", [None, 1e-12])
def test_similarity_matches_direct_formula_with_masked_frames(eps):
    torch.manual_seed(1)
    text, frames = torch.randn(3, 16), torch.randn(4, 12, 16)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 1:] = 0
    scores, weights = frame_weighted_similarity(text, frames, mask, eps=eps)
    expected_scores, expected_weights = direct_similarity(text, frames, mask)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    assert weights[:, 1, 7:].abs().max() == 0


def test_similarity_of_a_video_without_valid_frames_stays_finite():
    # 0/0 in the weight normalisation is overwritten by the mask fill, so the weights fall back to uniform
    text, frames = torch.randn(2, 8), torch.randn(1, 4, 8)
    empty = torch.zeros(1, 4, dtype=torch.long)
    for eps in (None, 1e-12):
        scores, weights = frame_weighted_similarity(text, frames, empty, eps=eps)
        torch.testing.assert_close(weights, torch.full((2, 1, 4), 0.25))
        expected = (F.normalize(frames[0], dim=-1) @ F.normalize(text, dim=-1).t()).mean(0)
        torch.testing.assert_close(scores[:, 0], expected)


# --- the assembled model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", ["perturbed", "hard"])
def test_fixed_mode_video_embedding_does_not_depend_on_batch_mates(topk):
    net = tiny_net(compat="fixed", inference_topk=topk)
    videos = random_video(3, seed=3)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        together, _ = net.encode_video(videos, mask)
        alone, _ = net.encode_video(videos[1:2], mask[1:2])
        with_others, _ = net.encode_video(
            torch.cat([random_video(2, seed=9), videos[1:2]]),
            torch.cat([torch.ones(2, 12, dtype=torch.long), mask[1:2]]),
        )
        again, _ = net.encode_video(videos[1:2], mask[1:2])
    torch.testing.assert_close(together[1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_others[2], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(again, alone)  # nothing is drawn from a running generator


def test_fixed_mode_selects_with_the_perturbed_topk_by_default_and_the_same_noise_for_every_video():
    """Spec §10.1, quirk 5: inference selects with the perturbed top-k the model is trained with unless asked for
    the hard one. Corrected inference gives each video the noise drawn from the seed for one video's frames."""
    perturbed, hard = tiny_net(spread_scores=False), tiny_net(spread_scores=False, inference_topk="hard")
    assert perturbed.config.inference_topk == "perturbed"
    videos, mask = random_video(2, frames=4, seed=5), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        soft, _ = perturbed.encode_video(videos, mask)
        plain, _ = hard.encode_video(videos, mask)
    assert not torch.allclose(soft, plain, atol=1e-4)
    selector = perturbed.selector
    tokens = torch.randn(2 * 4, 17, 64)
    scores = selector.predictor(tokens)[:, 1:]
    one_video = torch.randn((4, selector.samples, 16), generator=torch.Generator().manual_seed(selector.seed))
    expected = PerturbedTopK.apply(scores, one_video.repeat(2, 1, 1), selector.top_k, selector.sigma)
    selected = torch.einsum("nkp,npd->nkd", expected, tokens[:, 1:])
    torch.testing.assert_close(selector(tokens, hard=False, frames_per_video=4)[:, 1:], selected)


def test_official_mode_uses_noise_and_fixed_frame_count():
    net = tiny_net(compat="official")
    videos = random_video(2, seed=4)
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        first, _ = net.encode_video(videos, mask)
        second, _ = net.encode_video(videos, mask)
        net.selector.reseed()
        again, _ = net.encode_video(videos, mask)
        assert not torch.equal(first, second)  # stochastic at test time, as the reference
        assert torch.equal(first, again)  # but reproducible from the seed
        with pytest.raises(ValueError, match="12 frames"):
            net.encode_video(random_video(1, frames=8), torch.ones(1, 8, dtype=torch.long))
    fixed = tiny_net(compat="fixed")
    with torch.no_grad():
        frames, frame_mask = fixed.encode_video(random_video(1, frames=8), torch.ones(1, 8, dtype=torch.long))
    assert frames.shape == (1, 8, 64) and frame_mask.shape == (1, 8)


def test_training_forward_backward_reaches_every_trained_part():
    net = tiny_net(spread_scores=False).train()
    ids = torch.randint(1, 49405, (2, 32))
    ids[:, -1] = 49407
    logits = net(ids, random_video(2), torch.ones(2, 12, dtype=torch.long))
    assert logits.shape == (2, 2)
    logits.diag().sum().backward()
    for name in (
        "selector.predictor.in_conv.1.weight",
        "temporal.blocks.0.attn.in_proj_weight",
        "clip.visual.transformer.resblocks.2.attn.in_proj_weight",
        "clip.transformer.resblocks.0.mlp.c_fc.weight",
    ):
        grad = net.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_zero_shot_frames_are_clip_image_embeddings():
    net = tiny_net(zero_shot=True)
    videos = random_video(2, frames=4, seed=5)
    with torch.no_grad():
        frames, _ = net.encode_video(videos, torch.ones(2, 4, dtype=torch.long))
        expected = net.clip.encode_image(videos.flatten(0, 1)).view(2, 4, -1)
    torch.testing.assert_close(frames, expected, rtol=1e-5, atol=1e-5)
    assert net.selector is None and net.temporal is None and TINY_CLIP["embed_dim"] == frames.shape[-1]
