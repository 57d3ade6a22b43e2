"""Token selection: keep CLS plus K informative patches per frame (spec §4)."""

from __future__ import annotations

import torch
from torch import nn


class ScorePredictor(nn.Module):
    """Scores each token from its own features and the frame's CLS features; output in (-1, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = dim // 2
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(2 * hidden, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, D) → (N, L) scores."""
        local = self.in_conv(tokens)
        pair = torch.cat([local, local[:, :1].expand_as(local)], dim=-1)
        # squeeze(-1), not squeeze(): the reference's squeeze() also drops N when N = 1 (spec §10.1, quirk 4).
        return self.out_conv(pair).squeeze(-1)


def sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last axis, in ascending index (raster) order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


class PerturbedTopK(torch.autograd.Function):
    """Differentiable top-k by averaging hard top-k over Gaussian perturbations (Berthet et al.).

    Forward: A[n, k, p] = mean over samples of one_hot(sorted_topk(s + σZ))[k, p].
    Backward: the reference's diagonal estimator, G[n, k, p] = Σ_s Y[n, s, k, p] Z[n, s, p] / (S σ).
    Indices rather than (N, S, K, P) one-hot tensors are kept, so memory is O(N·S·K).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, noise: torch.Tensor, k: int, sigma: float) -> torch.Tensor:  # type: ignore[override]
        samples, patches = noise.shape[1], scores.shape[-1]
        picks = sorted_topk(scores.unsqueeze(1) + sigma * noise, k).transpose(1, 2)  # (N, K, S)
        indicator = scores.new_zeros(scores.shape[0], k, patches)
        indicator.scatter_add_(-1, picks, scores.new_ones(picks.shape))
        ctx.save_for_backward(picks, noise)
        ctx.sigma = sigma
        ctx.patches = patches
        return indicator / samples

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        picks, noise = ctx.saved_tensors
        samples = noise.shape[1]
        picked_noise = noise.unsqueeze(1).expand(-1, picks.shape[1], -1, -1).gather(-1, picks.unsqueeze(-1))
        jacobian = grad_output.new_zeros(grad_output.shape)
        jacobian.scatter_add_(-1, picks, picked_noise.squeeze(-1).to(grad_output.dtype))
        jacobian /= samples * ctx.sigma
        return (grad_output * jacobian).sum(dim=1), None, None, None


class TokenSelector(nn.Module):
    """CLS kept verbatim, plus K selected patches: soft (perturbed top-k) or hard (plain top-k)."""

    def __init__(self, dim: int, top_k: int = 3, samples: int = 500, sigma: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.predictor = ScorePredictor(dim)
        self.top_k = top_k
        self.samples = samples
        self.sigma = sigma
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._video_noise: tuple[tuple[object, ...], torch.Tensor] | None = None

    def reseed(self, seed: int | None = None) -> None:
        """Restart the perturbation noise, so that a run can be repeated exactly."""
        self.seed = self.seed if seed is None else seed
        self._generator = None

    def noise_state(self) -> tuple[int, torch.Tensor | None]:
        """Where the running noise stands, for ``restore_noise``."""
        return self.seed, None if self._generator is None else self._generator.get_state()

    def restore_noise(self, state: tuple[int, torch.Tensor | None]) -> None:
        """Put the running noise back where ``noise_state`` found it (e.g. after a forward pass that only checks)."""
        self.reseed(state[0])
        if state[1] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state[1])

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        # The reference draws on the CPU and then moves the noise; a private generator keeps runs reproducible
        # without touching torch's global RNG.
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=self._generator).to(device=like.device, dtype=like.dtype)

    def _same_noise_per_video(self, frames: int, scores: torch.Tensor) -> torch.Tensor:
        # Drawn once from the seed alone, for the frames of one video, and given to every video alike.
        key = (self.seed, frames, scores.shape[-1], scores.device, scores.dtype)
        if self._video_noise is None or self._video_noise[0] != key:
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((frames, self.samples, scores.shape[-1]), generator=generator)
            self._video_noise = key, noise.to(device=scores.device, dtype=scores.dtype)
        return self._video_noise[1].repeat(scores.shape[0] // frames, 1, 1)

    def forward(self, tokens: torch.Tensor, *, hard: bool, frames_per_video: int | None = None) -> torch.Tensor:
        """(N, L, D) tokens → (N, 1 + K, D): CLS then the selected patches in raster order.

        The perturbed top-k draws the next noise of the running generator (training, and the reference's
        inference), or, given ``frames_per_video``, the same noise for every video of that many frames: a video's
        features then depend on its frames only, not on what was drawn before or on its batch mates.
        """
        cls, patches = tokens[:, :1], tokens[:, 1:]
        scores = self.predictor(tokens)[:, 1:]
        if hard:
            picks = sorted_topk(scores, self.top_k)
            selected = patches.gather(1, picks.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        else:
            if frames_per_video is None:
                noise = self._noise((scores.shape[0], self.samples, scores.shape[1]), scores)
            else:
                noise = self._same_noise_per_video(frames_per_video, scores)
            indicator = PerturbedTopK.apply(scores, noise, self.top_k, self.sigma)
            selected = torch.einsum("nkp,npd->nkd", indicator.to(patches.dtype), patches)
        return torch.cat([cls, selected], dim=1)


def init_linear_weights(module: nn.Module) -> None:
    """The reference's ``init_weights`` for new modules: Linear weights ~ N(0, 0.02²), biases 0 (spec §9)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
