"""Severity parameters of the 15 corruptions, at any image size (runtime/lab/corruptions.py applies them).

Two published parameter sets (Hendrycks & Dietterich, ICLR 2019):

- CIFAR-10-C (make_cifar_c, images 32×32): used when the image's longer side is at most 32 px;
- ImageNet-C (make_imagenet_c, images 224×224): used for anything larger.

Parameters that are lengths in pixels (blur radii and σ, glass-blur swap distance, motion-blur
radius, snow's streak blur) are published for the reference size (32 or 224) and scaled here by
min(H, W) / reference, so a corruption covers the same fraction of the image as in the published
suite; at exactly 32×32 or 224×224 they are the published values. Integer lengths round and stay
≥ 1. Unitless parameters (noise levels, blend weights, zoom factors, JPEG quality, pixelate and
elastic fractions, fog strength and roughness) are used as published. ImageNet-C's elastic
transform is written with 244 for 224 (a typo its authors kept); we keep its values at 224 px.
"""
from __future__ import annotations

CIFAR_SIDE, IMAGENET_SIDE = 32, 224

# per corruption, per severity 1..5; a "kinds" tuple below says which entries are pixel lengths
CIFAR = {
    "gaussian_noise": [(0.04,), (0.06,), (0.08,), (0.09,), (0.10,)],
    "shot_noise": [(500,), (250,), (100,), (75,), (50,)],
    "impulse_noise": [(0.01,), (0.02,), (0.03,), (0.05,), (0.07,)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
    "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [(0.05,), (0.1,), (0.15,), (0.2,), (0.3,)],
    "contrast": [(0.75,), (0.5,), (0.4,), (0.3,), (0.15,)],
    # (α, σ, affine) as fractions of the side, as make_cifar_c writes them (IMSIZE * ...)
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [(0.95,), (0.9,), (0.85,), (0.75,), (0.65,)],
    "jpeg_compression": [(80,), (65,), (58,), (50,), (40,)],
}

IMAGENET = {
    "gaussian_noise": [(0.08,), (0.12,), (0.18,), (0.26,), (0.38,)],
    "shot_noise": [(60,), (25,), (12,), (5,), (3,)],
    "impulse_noise": [(0.03,), (0.06,), (0.09,), (0.17,), (0.27,)],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],
    "brightness": [(0.1,), (0.2,), (0.3,), (0.4,), (0.5,)],
    "contrast": [(0.4,), (0.3,), (0.2,), (0.1,), (0.05,)],
    # (α, σ, affine) in pixels at 224 (make_imagenet_c: 244 * ...), so kind "px" rather than "side"
    "elastic_transform": [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                          (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                          (244 * 0.12, 244 * 0.01, 244 * 0.02)],
    "pixelate": [(0.6,), (0.5,), (0.4,), (0.3,), (0.25,)],
    "jpeg_compression": [(25,), (18,), (15,), (10,), (7,)],
}

# None: unitless; "px": a length in pixels at the reference side (float, scaled); "int": the same,
# rounded, at least 1; "side": a fraction of the image side (multiplied by min(H, W))
KINDS = {
    "defocus_blur": ("px", "px"),
    "glass_blur": ("px", "int", None),
    "motion_blur": ("int", "px"),
    "snow": (None, None, None, None, "int", "px", None),
}


def regime(height: int, width: int) -> str:
    """'cifar' (CIFAR-10-C parameters) up to 32 px on the longer side, else 'imagenet'."""
    return "cifar" if max(height, width) <= CIFAR_SIDE else "imagenet"


def parameters(name: str, severity: int, height: int, width: int) -> tuple:
    """The severity's parameters for an image of height × width, lengths scaled as described above."""
    which = regime(height, width)
    table, reference = (CIFAR, CIFAR_SIDE) if which == "cifar" else (IMAGENET, IMAGENET_SIDE)
    values = table[name][severity - 1]
    side = min(height, width)
    factor = side / reference
    kinds = KINDS.get(name, (None,) * len(values))
    if name == "elastic_transform":
        kinds = ("side",) * 3 if which == "cifar" else ("px",) * 3
    out = []
    for value, kind in zip(values, kinds):
        if kind == "px":
            value = value * factor if factor != 1 else value
        elif kind == "int":
            value = max(1, int(round(value * factor)))
        elif kind == "side":
            value = value * side
        out.append(value)
    return tuple(out)
