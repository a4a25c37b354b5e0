"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) at 5 severities, at any image size.

    x = corrupt(x, "fog", 5, seed=0)        # float32 (N, 3, H, W) in [0, 1] -> same
    x, y = corrupted_split("fog", 5)          # Fashion-MNIST test split, generated once and cached

The demo's input is 3×32×32 (Fashion-MNIST padded to CIFAR's size): the CIFAR-10-C parameters as
published (make_cifar_c), listed below. Larger images (`tta replay --model`) get ImageNet-C's, with
pixel lengths scaled to the size (runtime/lab/corruption_params.py; frost's texture is enlarged with
the image, fog's fractal drawn at the next power of two and cropped). The implementations follow the
same recipes with numpy + OpenCV instead of scipy / scikit-image / ImageMagick / PIL. At 32×32
(c = the severity's parameters, severities 1..5):

- gaussian_noise: x + N(0, c²) per value, c = .04 .06 .08 .09 .10.
- shot_noise: Poisson(x·c)/c, c = 500 250 100 75 50.
- impulse_noise: salt-and-pepper on a fraction c = .01 .02 .03 .05 .07 of the values (per
  channel, half salt, half pepper, like skimage's random_noise "s&p").
- defocus_blur: an aliased disk of radius r, smoothed by a 3×3 Gaussian of σ a, convolved per
  channel; (r, a) = (.3,.4) (.4,.5) (.5,.6) (1,.2) (1.5,.1).
- glass_blur: Gaussian σ, then `iterations` passes of local pixel swaps within ±max_delta, then
  Gaussian σ again; (σ, max_delta, iterations) = (.05,1,1) (.25,1,1) (.4,1,1) (.25,1,2) (.4,1,2).
  The swap offsets are drawn from [−max_delta, max_delta) and the scan runs from the bottom-right
  corner up, as CIFAR-10-C's generator does. Gaussians: OpenCV, 4σ truncation, edge replicate.
- motion_blur: ImageMagick's one-sided motion blur (kernel weights exp(−i²/2σ²), i = 0..2·radius,
  along a random angle in [−45°, 45°]) rebuilt as an OpenCV filter2D kernel;
  (radius, σ) = (10,1) (10,1.5) (10,2) (10,2.5) (12,3).
- zoom_blur: mean of the image and its centre zooms by the factors 1, 1.01, … up to
  1.06 / 1.11 / 1.16 / 1.21 / 1.26 (bilinear, cropped back to 32×32).
- snow: a N(loc, scale) layer, zoomed, thresholded and motion-blurred (angle in [−135°, −45°]),
  added twice (once rotated 180°) to an image brightened towards its grey value;
  (loc, scale, zoom, threshold, radius, σ, blend) = (.1,.2,1,.6,8,3,.95) (.1,.2,1,.5,10,4,.9)
  (.15,.3,1.75,.55,10,4,.9) (.25,.3,2.25,.6,12,6,.85) (.3,.3,1.25,.65,14,12,.8).
- frost: c_img·x + c_frost·frost, with (c_img, c_frost) = (1,.2) (1,.3) (.9,.4) (.85,.4) (.75,.45),
  frost = a random 32×32 crop of one of 6 frost textures. CIFAR-10-C uses 6 photographs of frost
  shrunk to 20 %; we do not ship or download photos, so the textures are **synthesised**
  (`frost_texture`): many thin, bright ice needles in clusters over a hazy background, drawn at
  the shrunk scale, with the pale blue tint of the photos. Its statistics (mean ≈ 0.44, std ≈ 0.21) are
  close to the photos', not its exact appearance.
- fog: x + c·plasma, then rescaled by max/(max + c); plasma = a 32×32 diamond-square fractal with
  roughness decay d; (c, d) = (.2,3) (.5,3) (.75,2.5) (1,2) (1.5,1.75).
- brightness: HSV value + c, c = .05 .1 .15 .2 .3.
- contrast: (x − mean)·c + mean per channel, c = .75 .5 .4 .3 .15.
- elastic_transform: a random affine (corners of the central square moved by up to c·32)
  then a smooth displacement field (uniform noise blurred by σ·32, scaled by α·32, bilinear,
  reflect borders); (α, σ, c) = (0,0,.08) (.05,.2,.07) (.08,.06,.06) (.1,.04,.05) (.1,.03,.03).
- pixelate: box-downscale to c·32 px (30, 28, 27, 24, 20 px) and back up with nearest neighbour,
  c = .95 .9 .85 .75 .65.
- jpeg_compression: OpenCV JPEG at quality 80 65 58 50 40 (4:2:0, as PIL's default).

Outputs are rounded to 1/255 steps, as CIFAR-10-C stores uint8 images. Every random draw comes
from one numpy Generator seeded by (seed, corruption, severity), so a call is deterministic.
"""
from __future__ import annotations

import functools
import hashlib
import os
import zlib
from pathlib import Path

import cv2
import numpy as np

from runtime.console import Progress
from runtime.lab import corruption_cache, datasets
from runtime.lab import corruption_params as params

CORRUPTIONS = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression"]
SEVERITIES = (1, 2, 3, 4, 5)
SIZE = 32


# ----------------------------------------------------------------------------- helpers

def _gaussian(img: np.ndarray, sigma: float, truncate: float = 4.0, border=cv2.BORDER_REPLICATE) -> np.ndarray:
    if sigma <= 0:
        return img
    k = 2 * int(np.ceil(truncate * sigma)) + 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=border)


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by `factor` (bilinear) and crop back to the input size."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[top:top + ch, left:left + cw]
    zh, zw = int(round(ch * factor)), int(round(cw * factor))
    zoomed = cv2.resize(crop, (zw, zh), interpolation=cv2.INTER_LINEAR)
    if zoomed.ndim < img.ndim:
        zoomed = zoomed[..., None]
    top, left = (zh - h) // 2, (zw - w) // 2
    return zoomed[top:top + h, left:left + w]


def _motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick's one-sided motion blur as a 2-D correlation kernel: Gaussian weights along a ray."""
    length = min(2 * radius, int(np.ceil(3 * sigma)) + 1)  # weights past 3σ are negligible
    size = 2 * length + 1
    kernel = np.zeros((size, size), np.float32)
    theta = np.deg2rad(angle_deg)
    for i in range(length + 1):
        x = int(round(length + i * np.cos(theta)))
        y = int(round(length - i * np.sin(theta)))
        kernel[y, x] += np.exp(-(i * i) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def _motion_blur(img: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    out = cv2.filter2D(img, -1, _motion_kernel(radius, sigma, angle), borderType=cv2.BORDER_REPLICATE)
    return out[..., None] if out.ndim < img.ndim else out


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    half = 8 if radius <= 8 else int(np.ceil(radius))
    ksize = (3, 3) if radius <= 8 else (5, 5)
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    return cv2.GaussianBlur(disk, ksize, sigmaX=alias_blur)


def plasma_fractal(rng: np.random.Generator, size: int = SIZE, decay: float = 3.0) -> np.ndarray:
    """A size×size diamond-square fractal in [0, 1] (size a power of two); each finer level's
    random perturbation is `decay` times weaker, so a smaller decay gives rougher fog."""
    grid = np.zeros((size + 1, size + 1), np.float64)
    step, wibble = size, 100.0
    while step > 1:
        half = step // 2
        wibble /= decay
        # diamond step: centre of each square = mean of its 4 corners + noise
        corners = (grid[0:size:step, 0:size:step] + grid[0:size:step, step::step]
                   + grid[step::step, 0:size:step] + grid[step::step, step::step]) / 4
        grid[half:size:step, half:size:step] = corners + rng.uniform(-wibble, wibble, corners.shape)
        # square step: edge midpoints = mean of their (up to 4) neighbours + noise; wraps around
        for y0, x0 in ((0, half), (half, 0)):
            ys, xs = np.arange(y0, size + 1, step), np.arange(x0, size + 1, step)
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            total = (grid[(yy - half) % size, xx] + grid[(yy + half) % size, xx]
                     + grid[yy, (xx - half) % size] + grid[yy, (xx + half) % size])
            grid[yy, xx] = total / 4 + rng.uniform(-wibble, wibble, yy.shape)
        step = half
    out = grid[:size, :size]
    out -= out.min()
    return (out / out.max()).astype(np.float32)


@functools.lru_cache(maxsize=None)
def frost_texture(index: int, size: int = 160) -> np.ndarray:
    """Synthetic frost texture number `index` (0..5), float32 (size, size, 3) in [0, 1].

    Stands in for CIFAR-10-C's frost photographs (shrunk to 20 %): a hazy, uneven bright
    background plus clusters of thin, bright ice needles radiating from random seeds, with
    a pale blue tint. Deterministic per index (fixed seed), independent of the caller's seed."""
    rng = np.random.default_rng(1000 + index)
    haze = cv2.resize(rng.uniform(0, 1, (size // 16, size // 16)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)
    canvas = 0.2 + 0.25 * np.clip(haze, 0, 1)
    needles = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(120, 160))):  # crystal clusters
        cx, cy = rng.uniform(0, size, 2)
        for _ in range(int(rng.integers(4, 10))):  # needles per cluster
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(2, 10)
            end = (int(cx + length * np.cos(angle)), int(cy + length * np.sin(angle)))
            cv2.line(needles, (int(cx), int(cy)), end, float(rng.uniform(0.5, 1.0)), 1, cv2.LINE_AA)
    needles = np.maximum(needles, _gaussian(needles, 1.0) * 1.5)  # glow around the needles
    gray = np.clip(canvas + 0.8 * needles + rng.normal(0, 0.03, (size, size)).astype(np.float32), 0, 1)
    tint = np.array([0.85, 0.93, 1.0], np.float32)  # RGB: frost photos are pale blue
    return np.clip(gray[..., None] * tint, 0, 1)


# ----------------------------------------------------------------------------- corruptions
# Each takes a batch NHWC float32 in [0, 1], the severity's parameters c (runtime/lab/corruption_params.py,
# already scaled to the image size) and a numpy Generator.

def gaussian_noise(x, c, rng):
    return x + rng.normal(0.0, c[0], x.shape)


def shot_noise(x, c, rng):
    return rng.poisson(x * c[0]) / c[0]


def impulse_noise(x, c, rng):
    out = x.copy()
    hit = rng.random(x.shape) < c[0]
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def defocus_blur(x, c, rng):
    kernel = _disk(*c)
    return np.stack([cv2.filter2D(img, -1, kernel) for img in x])


def glass_blur(x, c, rng):
    sigma, delta, iterations = c
    out = np.stack([_gaussian(img, sigma) for img in x])
    n, height, width = x.shape[:3]
    batch = np.arange(n)
    for _ in range(iterations):  # one swap per pixel, bottom-right to top-left, every image at once
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dy, dx = rng.integers(-delta, delta, (2, n))  # high end excluded, as in CIFAR-10-C
                hp, wp = h + dy, w + dx
                a = out[batch, h, w].copy()
                out[batch, h, w] = out[batch, hp, wp]
                out[batch, hp, wp] = a
    return np.stack([_gaussian(img, sigma) for img in out])


def motion_blur(x, c, rng):
    return np.stack([_motion_blur(img, c[0], c[1], rng.uniform(-45, 45)) for img in x])


def zoom_blur(x, c, rng):
    factors = np.arange(*c)
    out = np.empty_like(x)
    for i, img in enumerate(x):
        acc = img.copy()
        for f in factors:
            acc += _clipped_zoom(img, f)
        out[i] = acc / (len(factors) + 1)
    return out


def snow(x, c, rng):
    loc, scale, zoom, thr, radius, sigma, blend = c
    out = np.empty_like(x)
    for i, img in enumerate(x):
        layer = rng.normal(loc, scale, img.shape[:2]).astype(np.float32)
        layer = _clipped_zoom(layer[..., None], zoom)[..., 0]
        layer[layer < thr] = 0
        layer = _motion_blur(np.clip(layer, 0, 1), radius, sigma, rng.uniform(-135, -45))
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[..., None]
        base = blend * img + (1 - blend) * np.maximum(img, gray * 1.5 + 0.5)
        out[i] = base + layer[..., None] + np.rot90(layer, 2)[..., None]
    return out


@functools.lru_cache(maxsize=12)
def _frost_at(index: int, side: int) -> np.ndarray:
    """Frost texture `index` for images whose longer side is `side`: the 160-px texture (drawn for
    32-px crops) resized to 5 × side, so a crop shows as much frost as at 32×32."""
    tex = frost_texture(index)
    return tex if side == SIZE else cv2.resize(tex, (5 * side, 5 * side), interpolation=cv2.INTER_LINEAR)


def frost(x, c, rng):
    c_img, c_frost = c
    height, width = x.shape[1:3]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        tex = _frost_at(int(rng.integers(6)), max(height, width))
        if height == width:
            top, left = rng.integers(0, tex.shape[0] - height, 2)
        else:
            top, left = rng.integers(0, tex.shape[0] - height), rng.integers(0, tex.shape[1] - width)
        out[i] = c_img * img + c_frost * tex[top:top + height, left:left + width]
    return out


def fog(x, c, rng):
    strength, decay = c
    height, width = x.shape[1:3]
    mapsize = 1 << int(np.ceil(np.log2(max(height, width))))  # ImageNet-C: 256, cropped to 224
    out = np.empty_like(x)
    for i, img in enumerate(x):
        peak = img.max()
        fogged = img + strength * plasma_fractal(rng, mapsize, decay)[:height, :width, None]
        out[i] = fogged * peak / (peak + strength)
    return out


def brightness(x, c, rng):
    out = np.empty_like(x)
    for i, img in enumerate(x):
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)  # float: V in [0, 1]
        hsv[..., 2] = np.clip(hsv[..., 2] + c[0], 0, 1)
        out[i] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out


def contrast(x, c, rng):
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c[0] + means


def elastic_transform(x, c, rng):
    alpha, sigma, affine = c
    height, width = x.shape[1:3]
    cy, cx, half = height // 2, width // 2, min(height, width) // 3
    src = np.float32([[cx + half, cy + half], [cx + half, cy - half], [cx - half, cy - half]])
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    out = np.empty_like(x)
    for i, img in enumerate(x):
        dst = (src + rng.uniform(-affine, affine, src.shape)).astype(np.float32)
        warped = cv2.warpAffine(img, cv2.getAffineTransform(src, dst), (width, height),
                                borderMode=cv2.BORDER_REFLECT_101)
        noise = [rng.uniform(-1, 1, (height, width)).astype(np.float32) for _ in range(2)]
        dx, dy = (_gaussian(n, sigma, 3.0, cv2.BORDER_REFLECT) * alpha for n in noise)
        out[i] = cv2.remap(warped, grid_x + dx, grid_y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out


def pixelate(x, c, rng):
    height, width = x.shape[1:3]
    small = (max(1, int(width * c[0])), max(1, int(height * c[0])))
    return np.stack([cv2.resize(cv2.resize(img, small, interpolation=cv2.INTER_AREA),
                                (width, height), interpolation=cv2.INTER_NEAREST) for img in x])


def jpeg_compression(x, c, rng):
    out = np.empty_like(x)
    for i, img in enumerate(x):
        bgr = cv2.cvtColor(np.round(img * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(c[0])])
        if not ok:
            raise RuntimeError("OpenCV could not JPEG-encode an image")
        out[i] = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    return out


_FUNCTIONS = {name: globals()[name] for name in CORRUPTIONS}
MIN_SIDE = 8


def _rng(name: str, severity: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, CORRUPTIONS.index(name), severity])


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to float32 (N, 3, H, W) images in [0, 1]
    (H, W ≥ 8; the parameters for that size: runtime/lab/corruption_params.py)."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, not {severity!r}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[2:]) < MIN_SIDE:
        raise ValueError(f"expected (N, 3, H, W) images with H, W >= {MIN_SIDE}, got {x.shape}")
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    c = params.parameters(name, severity, x.shape[2], x.shape[3])
    out = _FUNCTIONS[name](nhwc, c, _rng(name, severity, seed))
    out = np.round(np.clip(out, 0, 1) * 255) / 255  # uint8 levels, as CIFAR-10-C stores them
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2), dtype=np.float32)


# ----------------------------------------------------------------------------- cache

def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where corrupted splits are cached: the argument, else env TTA_CACHE_DIR, else ~/.cache/tta-runtime."""
    if override:
        return Path(override)
    return Path(os.environ.get("TTA_CACHE_DIR") or Path.home() / ".cache" / "tta-runtime")


def corrupted_split(name: str, severity: int, split: str = "test", n: int | None = None, seed: int = 0,
                    data_dir: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                    show_progress: bool = True, as_uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The whole Fashion-MNIST `split`, corrupted, as (x float32 (N, 3, 32, 32) in [0, 1], y int64 (N,));
    the first `n` images when n is given; x as uint8 0..255 (the stored form) with as_uint8.
    Generated once (in chunks of 1000, chunk k seeded by (seed, k)) into the cache, read from there
    afterwards: NAME-sS-seedK.SHA256.npz, its digest checked before use (runtime/lab/corruption_cache.py)."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    raw_x, y = datasets.load_split(split, data_dir)
    # the key includes a digest of the source images, so another copy of the data is not mixed up
    digest = hashlib.sha1(raw_x[:100].tobytes()).hexdigest()[:8]
    folder, key = cache_dir(cache) / "fashion-mnist-c" / f"{split}-{digest}", f"{name}-s{severity}-seed{seed}"
    stored, _ = corruption_cache.load_verified(folder, key, (len(raw_x), 3, SIZE, SIZE), ".npz")  # SHA-256 checked
    if stored is None:
        chunk = 1000
        parts = []
        bar = Progress(total=len(raw_x), desc=f"{name} s{severity}", disable=not show_progress)
        for k, start in enumerate(range(0, len(raw_x), chunk)):
            images = datasets.to_model_input(raw_x[start:start + chunk])
            chunk_seed = zlib.crc32(f"{seed}/{k}".encode())
            parts.append(np.round(corrupt(images, name, severity, chunk_seed) * 255).astype(np.uint8))
            bar.update(len(images))
        bar.close()
        stored = np.concatenate(parts)
        corruption_cache.save_verified(folder, key, corruption_cache.encode(stored, ".npz"), ".npz")
    if n is not None:
        stored, y = stored[:n], y[:n]
    return (stored, y) if as_uint8 else (stored.astype(np.float32) / 255, y)
