"""The CoTTA / RMT "hard" test-time augmentation, in plain torch (no torchvision).

Applied to a whole batch (B, 3, H, W) in [0, 1]: one random draw per call is shared by every
image of the batch (only the Gaussian noise is per pixel), in this order:
clip → colour jitter (brightness, contrast, saturation, hue, gamma in a random order) →
edge padding of H/2 → random affine (rotation ±15°, translation ±1/16, scale 0.9–1.1, bilinear,
zero fill) → Gaussian blur (kernel 5, σ ∈ [0.001, 0.5]) → centre crop back to H×W →
horizontal flip (p 0.5) → additive noise (std 0.005) → clip.

The draws (randperm, uniforms, rand, randn) are made on the CPU, from `generator` or, when it
is None, from torch's global generator in the same order and with the same arithmetic as the
reference code's torchvision transforms, so that conformance runs reproduce its numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CottaAugment:
    def __init__(self, generator: torch.Generator | None = None, soft: bool = False, noise_std: float = 0.005):
        self.generator = generator
        self.noise_std = noise_std
        self.brightness = (0.8, 1.2) if soft else (0.6, 1.4)
        self.contrast = (0.85, 1.15) if soft else (0.7, 1.3)
        self.saturation = (0.75, 1.25) if soft else (0.5, 1.5)
        self.hue = (-0.03, 0.03) if soft else (-0.06, 0.06)
        self.gamma = (0.85, 1.15) if soft else (0.7, 1.3)
        self.degrees = (-8.0, 8.0) if soft else (-15.0, 15.0)
        self.translate = 1 / 16
        self.scale = (0.95, 1.05) if soft else (0.9, 1.1)
        self.blur_sigma = (0.001, 0.25) if soft else (0.001, 0.5)

    def _uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high, generator=self.generator).item()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = x.clamp(0.0, 1.0)
        x = self._colour_jitter(x)
        pad = int(height / 2)
        x = F.pad(x, [pad, pad, pad, pad], mode="replicate")
        x = self._random_affine(x)
        x = self._gaussian_blur(x)
        top = int(round((x.shape[-2] - height) / 2.0))
        left = int(round((x.shape[-1] - width) / 2.0))
        x = x[..., top:top + height, left:left + width]
        if torch.rand(1, generator=self.generator) < 0.5:
            x = x.flip(-1)
        noise = torch.randn(x.size(), generator=self.generator) * self.noise_std + 0.0
        x = x + noise.to(x.device)
        return x.clamp(0.0, 1.0)

    # --- colour ---------------------------------------------------------------------
    def _colour_jitter(self, x):
        for op in torch.randperm(5, generator=self.generator).tolist():
            if op == 0:
                x = _blend(x, torch.zeros_like(x), self._uniform(*self.brightness))
            elif op == 1:
                factor = self._uniform(*self.contrast)
                x = _blend(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), factor)
            elif op == 2:
                x = _blend(x, _grey(x), self._uniform(*self.saturation))
            elif op == 3:
                x = _shift_hue(x, self._uniform(*self.hue))
            else:
                factor = self._uniform(*self.gamma)
                x = (x.clamp(1e-8, 1.0) ** factor).clamp(0.0, 1.0)  # clamp first: no NaN gradients
        return x

    # --- geometry -------------------------------------------------------------------
    def _random_affine(self, x):
        height, width = x.shape[-2:]
        angle = self._uniform(*self.degrees)
        max_dx, max_dy = self.translate * width, self.translate * height
        tx = int(round(self._uniform(-max_dx, max_dx)))
        ty = int(round(self._uniform(-max_dy, max_dy)))
        scale = self._uniform(*self.scale)
        # Inverse map (output pixel -> input pixel) about the image centre, in pixels.
        rot = math.radians(angle)
        cos, sin = math.cos(rot), math.sin(rot)
        m = [cos / scale, sin / scale, 0.0, -sin / scale, cos / scale, 0.0]
        m[2] += m[0] * -tx + m[1] * -ty
        m[5] += m[3] * -tx + m[4] * -ty
        theta = torch.tensor(m, dtype=x.dtype, device=x.device).reshape(1, 2, 3)
        # Sampling grid in normalised coordinates (align_corners=False convention).
        xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width, device=x.device)
        ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height, device=x.device)
        base = torch.empty(1, height, width, 3, dtype=x.dtype, device=x.device)
        base[..., 0].copy_(xs)
        base[..., 1].copy_(ys.unsqueeze(-1))
        base[..., 2].fill_(1)
        scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=x.dtype, device=x.device)
        grid = base.view(1, height * width, 3).bmm(scaled).view(1, height, width, 2)
        grid = grid.expand(x.shape[0], height, width, 2)
        # A ones channel tells how much of each output pixel came from inside the image; the
        # rest is filled with 0 (torchvision's fill blending, with fill = 0).
        ones = torch.ones((x.shape[0], 1, height, width), dtype=x.dtype, device=x.device)
        out = F.grid_sample(torch.cat((x, ones), dim=1), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        return out[:, :-1] * out[:, -1:]

    def _gaussian_blur(self, x, kernel_size: int = 5):
        sigma = self._uniform(*self.blur_sigma)
        half = (kernel_size - 1) * 0.5
        t = torch.linspace(-half, half, steps=kernel_size, dtype=x.dtype, device=x.device)
        pdf = torch.exp(-0.5 * (t / sigma).pow(2))
        k1 = pdf / pdf.sum()
        kernel = torch.mm(k1[:, None], k1[None, :]).expand(x.shape[-3], 1, kernel_size, kernel_size)
        p = kernel_size // 2
        return F.conv2d(F.pad(x, [p, p, p, p], mode="reflect"), kernel, groups=x.shape[-3])


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def _shift_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue channel by `shift` (a fraction of the circle) through HSV."""
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.max(dim=-3).values, x.min(dim=-3).values
    grey = maxc == minc  # hue and saturation undefined: use a safe divisor, the result is unaffected
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    sat = chroma / torch.where(grey, ones, maxc)
    divisor = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    hue = (hue + shift) % 1.0
    # back to RGB
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    v = maxc
    p = torch.clamp(v * (1.0 - sat), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - sat * frac), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - sat * (1.0 - frac)), 0.0, 1.0)
    choose = lambda *c: torch.gather(torch.stack(c), 0, sector.unsqueeze(0)).squeeze(0)  # noqa: E731
    return torch.stack((choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)), dim=-3)
