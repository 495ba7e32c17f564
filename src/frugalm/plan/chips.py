"""The accelerator catalogue: `chips.toml` plus any user chip files, as typed `Chip` records.

The figures live in a data file with a source per figure so that they can be audited and corrected
without touching code; this module only parses, checks and looks them up (by key or alias).
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from frugalm.config import ConfigError, from_dict
from frugalm.plan.errors import PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_CATALOGUE = Path(__file__).with_name("chips.toml")

# Precision name -> bit length, for peaks and for the export rules' TPP (TOPS x bits).
PRECISION_BITS = {"fp4": 4, "fp8": 8, "int8": 8, "bf16": 16, "fp16": 16}

# Numeric fields that must carry a source in the built-in catalogue ("price" covers the price fields).
_FIGURE_FIELDS = (
    "bf16_tflops", "fp16_tflops", "fp8_tflops", "int8_tops", "fp4_tflops", "hbm_gb", "hbm_tbps",
    "scale_up_bidir_gbs", "scale_up_effective_gbs", "io_bidir_gbs", "scale_up_domain", "scale_out_gbps",
    "die_area_mm2", "tdp_w", "purchase_usd",
)
_PRICE_FIELDS = ("price_low", "price_typical", "price_high")


@dataclass
class ChipSpec:
    """One `[chips.KEY]` table as written in a catalogue file (strict keys)."""

    name: str
    vendor: str
    hbm_gb: float
    hbm_tbps: float
    scale_up_bidir_gbs: float
    scale_up_domain: int
    scale_out_gbps: float
    tdp_w: float
    bf16_tflops: float = 0.0
    fp16_tflops: float = 0.0
    fp8_tflops: float = 0.0
    int8_tops: float = 0.0
    fp4_tflops: float = 0.0
    scale_up_effective_gbs: Optional[float] = None
    io_bidir_gbs: Optional[float] = None
    die_area_mm2: Optional[float] = None
    designer_country: str = ""
    datacenter: bool = True
    price_low: Optional[float] = None
    price_typical: Optional[float] = None
    price_high: Optional[float] = None
    price_date: Optional[str] = None
    purchase_usd: Optional[float] = None
    aliases: list[str] = field(default_factory=list)
    notes: str = ""
    sources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chip:
    """An accelerator with dense peaks per precision and the links the planner's time model uses."""

    key: str
    name: str
    vendor: str
    peaks_tflops: dict[str, float]
    hbm_gb: float
    hbm_tbps: float
    scale_up_bidir_gbs: float
    scale_up_effective_gbs: Optional[float]
    io_bidir_gbs: float
    scale_up_domain: int
    scale_out_gbps: float
    die_area_mm2: Optional[float]
    tdp_w: float
    datacenter: bool
    designer_country: str
    price_low: Optional[float]
    price_typical: Optional[float]
    price_high: Optional[float]
    price_date: Optional[str]
    purchase_usd: Optional[float]
    aliases: tuple[str, ...]
    notes: str
    sources: dict[str, str]
    origin: str

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for `precision`; a chip without that precision is a plan error, not a zero."""
        value = self.peaks_tflops.get(precision, 0.0)
        if value <= 0:
            have = ", ".join(p for p, v in self.peaks_tflops.items() if v > 0) or "none"
            raise PlanError(f"chip {self.key!r} has no {precision} peak in the catalogue (it has: {have})")
        return value

    def has(self, precision: str) -> bool:
        return self.peaks_tflops.get(precision, 0.0) > 0

    @property
    def price_usd_per_hour(self) -> Optional[float]:
        """Typical rental price; the midpoint of the range when only a range is published."""
        if self.price_typical is not None:
            return self.price_typical
        if self.price_low is not None and self.price_high is not None:
            return 0.5 * (self.price_low + self.price_high)
        return self.price_low if self.price_low is not None else self.price_high

    def scale_up_gbs_per_direction(self, efficiency: float) -> float:
        """Usable scale-up bandwidth per direction: the measured figure if published, else nominal x efficiency."""
        if self.scale_up_effective_gbs:
            return self.scale_up_effective_gbs
        return self.scale_up_bidir_gbs / 2 * efficiency

    def scale_out_gbs_per_direction(self, efficiency: float) -> float:
        return self.scale_out_gbps / 8 * efficiency


def _chip_from_spec(key: str, spec: ChipSpec, origin: str) -> Chip:
    peaks = {
        "bf16": spec.bf16_tflops, "fp16": spec.fp16_tflops, "fp8": spec.fp8_tflops,
        "int8": spec.int8_tops, "fp4": spec.fp4_tflops,
    }
    problems = []
    if not any(v > 0 for v in peaks.values()):
        problems.append("no peak rate (bf16_tflops, fp8_tflops, ...) is given")
    for name in ("hbm_gb", "hbm_tbps", "scale_up_domain", "tdp_w"):
        if getattr(spec, name) <= 0:
            problems.append(f"{name} must be > 0")
    for name in ("scale_up_bidir_gbs", "scale_out_gbps"):
        if getattr(spec, name) < 0:
            problems.append(f"{name} must be >= 0")
    if spec.die_area_mm2 is not None and spec.die_area_mm2 <= 0:
        problems.append("die_area_mm2 must be > 0 when given")
    if problems:
        raise PlanError(f"chip {key!r} in {origin}: " + "; ".join(problems))
    return Chip(
        key=key, name=spec.name, vendor=spec.vendor, peaks_tflops=peaks, hbm_gb=spec.hbm_gb,
        hbm_tbps=spec.hbm_tbps, scale_up_bidir_gbs=spec.scale_up_bidir_gbs,
        scale_up_effective_gbs=spec.scale_up_effective_gbs,
        io_bidir_gbs=spec.io_bidir_gbs if spec.io_bidir_gbs is not None else spec.scale_up_bidir_gbs,
        scale_up_domain=spec.scale_up_domain, scale_out_gbps=spec.scale_out_gbps,
        die_area_mm2=spec.die_area_mm2, tdp_w=spec.tdp_w, datacenter=spec.datacenter,
        designer_country=spec.designer_country, price_low=spec.price_low, price_typical=spec.price_typical,
        price_high=spec.price_high, price_date=spec.price_date, purchase_usd=spec.purchase_usd,
        aliases=tuple(a.lower() for a in spec.aliases), notes=spec.notes,
        sources={str(k): str(v) for k, v in spec.sources.items()}, origin=origin,
    )


def missing_sources(spec_table: dict[str, Any]) -> list[str]:
    """Figures in one raw `[chips.KEY]` table that have no entry in its `sources` table."""
    sources = spec_table.get("sources", {})
    missing = [f for f in _FIGURE_FIELDS if f in spec_table and f not in sources]
    if any(f in spec_table for f in _PRICE_FIELDS) and "price" not in sources:
        missing.append("price")
    return missing


def _read_table_file(path: Path) -> dict[str, Any]:
    """A user chip file: TOML, or YAML when PyYAML is installed (same `chips: {key: {...}}` layout)."""
    if not path.is_file():
        raise PlanError(f"chip file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PlanError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the file as TOML") from None
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: invalid YAML: {e}") from None
    else:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise PlanError(f"{path}: invalid TOML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("chips"), dict) or not data["chips"]:
        raise PlanError(f"{path}: expected a top-level 'chips' table holding one table per chip, e.g. [chips.mychip]")
    return data["chips"]


class Catalogue:
    """Chips by key, with case-insensitive lookup by key or alias."""

    def __init__(self, chips: dict[str, Chip]) -> None:
        self.chips = dict(chips)
        self._names: dict[str, str] = {}
        for key, chip in self.chips.items():
            for name in (key, *chip.aliases):
                self._names[name.lower()] = key

    def __iter__(self):
        return iter(self.chips.values())

    def __len__(self) -> int:
        return len(self.chips)

    def get(self, name: str) -> Chip:
        key = self._names.get(name.strip().lower())
        if key is None:
            close = difflib.get_close_matches(name.strip().lower(), list(self._names), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PlanError(
                f"unknown chip {name!r}.{hint} Known chips: {', '.join(sorted(self.chips))}. "
                "Add your own with --chips FILE (TOML/YAML with a [chips.NAME] table)."
            )
        return self.chips[key]


def load_catalogue(extra_files: list[str] | tuple[str, ...] = ()) -> Catalogue:
    """The built-in catalogue, then each user file in order (a user chip replaces a built-in one of the same key)."""
    chips: dict[str, Chip] = {}
    sources = [(BUILTIN_CATALOGUE, True)] + [(Path(p), False) for p in extra_files]
    for path, builtin in sources:
        tables = _read_table_file(path)
        for key, table in tables.items():
            if not isinstance(table, dict):
                raise PlanError(f"{path}: chips.{key} must be a table")
            try:
                spec = from_dict(ChipSpec, table, section=f"chips.{key}")
            except ConfigError as e:
                raise PlanError(f"{path}: {e}") from None
            if not builtin and not spec.sources:
                spec.sources = {"all": f"user-supplied ({path})"}
            chips[key.lower()] = _chip_from_spec(key.lower(), spec, str(path))
    return Catalogue(chips)
