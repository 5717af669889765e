"""Which augmentations a dataset allows: a property of the data, recorded in its manifest.

Horizontal flips are EDM's opt-in `--xflip`: harmless for natural photos, wrong for digits and text (a
mirrored 3 is not a 3; the domain classifier scores mirrored real digits at 0.34). A manifest's
`"mirror_invariant"` says whether mirroring preserves an image's meaning: true, false, or absent/None
(unknown: image folders, `.npz`; the user decides and answers for it).
"""

from __future__ import annotations

from typing import Any

MIRROR_KEY = "mirror_invariant"


def mirror_invariant(manifest: dict[str, Any]) -> bool | None:
    """True / False when the manifest says whether mirroring preserves meaning, None when unknown."""
    v = manifest.get(MIRROR_KEY)
    return None if v is None else bool(v)


def check_xflip(manifest: dict[str, Any], data: str) -> None:
    """ValueError when flips are asked for on data whose manifest says mirroring changes the class."""
    if mirror_invariant(manifest) is False:
        name = (manifest.get("source") or {}).get("kind") or (manifest.get("source") or {}).get("uri") or data
        raise ValueError(
            f"xflip=True (--xflip) on data={data} ({name}): its manifest says mirroring changes an image's "
            f"meaning ({MIRROR_KEY}=false; a mirrored digit is not that digit); train without flips"
        )


__all__ = ["MIRROR_KEY", "check_xflip", "mirror_invariant"]
