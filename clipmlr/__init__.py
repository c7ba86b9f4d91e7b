"""clipmlr: multi-label recognition with partial labels on a frozen CLIP (PositiveCoOp, WACV 2025)."""
