"""The bundled tiny pipelines by model family: the one registry of family name -> directory
(``fastpref-demo --family``). Each directory's preference set is its line in
``fastpref.training.args.BUNDLED_DATA``."""

from pathlib import Path

from .args import ASSETS, BUNDLED_DATA, DEFAULT_MODEL

BUNDLED_PIPELINES = {
    "sd15": DEFAULT_MODEL,
    "sdxl": ASSETS / "tiny-sdxl",
    "sd3": ASSETS / "tiny-sd3",
    "flux": ASSETS / "tiny-flux",
    "wan": ASSETS / "tiny-wan",
}
"""Family name -> its bundled tiny pipeline (diffusers layout). A family whose directory, or whose
``BUNDLED_DATA`` preference set, is not in this installation is listed but not available."""


def available_families() -> list[str]:
    """The families of ``BUNDLED_PIPELINES`` whose pipeline (``model_index.json``) and bundled
    preference set are both present, in registry order."""
    return [
        name
        for name, path in BUNDLED_PIPELINES.items()
        if (path / "model_index.json").is_file() and BUNDLED_DATA.get(path.resolve(), Path("/nonexistent")).is_file()
    ]


def bundled_pipeline(family: str, flag: str = "--family") -> Path:
    """The bundled pipeline directory of ``family``; ValueError naming ``flag``, the value and the
    available families when it is unknown or absent from this installation."""
    available = available_families()
    if family not in BUNDLED_PIPELINES:
        raise ValueError(f"{flag}: expected one of {list(BUNDLED_PIPELINES)}, got {family!r} (available: {available})")
    if family not in available:
        path = BUNDLED_PIPELINES[family]
        raise ValueError(
            f"{flag}: the bundled tiny {family} pipeline is not in this installation ({str(path)!r} with its "
            f"preference set in BUNDLED_DATA); available families: {available}"
        )
    return BUNDLED_PIPELINES[family]
