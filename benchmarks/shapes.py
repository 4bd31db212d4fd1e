"""What the kernel benchmarks share: the shapes they time and the FLOPs they count."""

from __future__ import annotations

# The flash-linear-attention README's shapes (REFERENCE.md section 4), as BxTxHxD.
FLA_README_SHAPES = ["1x8192x96x128", "4x4096x64x128", "8x1024x8x64"]
RULES = ["scalar_decay", "delta", "gated_delta"]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'BxTxHxD' -> (B, T, H, D)."""
    B, T, H, D = (int(x) for x in text.split("x"))
    return B, T, H, D


def nominal_flops(rule: str, B: int, T: int, H: int, D: int, C: int = 64) -> float:
    """Forward FLOPs of the chunked algorithm (K = V = D): per chunk, q k^T and P U (2 C^2 D
    each), q S and k^T U (2 C D^2 each); the delta rules add w S (2 C D^2), k k^T (2 C^2 D) and
    the triangular solve against [w | u] (2 C^2 D). Forward plus backward counts 3x."""
    per_chunk = 4 * C * C * D + 4 * C * D * D
    if rule in ("delta", "gated_delta"):
        per_chunk += 2 * C * D * D + 4 * C * C * D
    return float(B * H * (-(-T // C)) * per_chunk)
