"""US export-control classification of a chip: the Oct-2022 and Oct-2023 tests, plus dated overlays.

TPP and performance density are derived from the catalogue's dense peaks so a corrected figure corrects
the classification too. The parametric tests say what a chip's numbers are; `policy.toml` records what
happened to specific chips afterwards (licence letters, revenue-share deals), each with a date.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from frugalm.plan.chips import PRECISION_BITS, Chip
from frugalm.plan.errors import PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

POLICY_FILE = Path(__file__).with_name("policy.toml")

# Oct-2022 IFR (87 FR 62186): both tests must be met.
TPP_2022 = 4800.0
IO_2022_GBS = 600.0
# Oct-2023 AC/S IFR (88 FR 73458), 3A090.a and 3A090.b thresholds.
TPP_A = 4800.0
TPP_A_DENSE = 1600.0
PD_A = 5.92
TPP_B_LOW = 2400.0
PD_B_LOW = 1.6
PD_B_MID = 3.2


def tpp(chip: Chip) -> float:
    """Total processing performance: max over precisions of dense TOPS x bit length.

    BIS defines TPP = 2 x MacTOPS x bit length; a datasheet's TOPS/TFLOPS already counts a MAC as two
    operations, so dense datasheet TOPS x bits is the same number. Sparse figures would double it.
    """
    return max(chip.peaks_tflops.get(p, 0.0) * bits for p, bits in PRECISION_BITS.items())


def performance_density(chip: Chip) -> Optional[float]:
    """TPP per mm2 of logic die (HBM excluded); None when the catalogue has no die area."""
    return tpp(chip) / chip.die_area_mm2 if chip.die_area_mm2 else None


def classify_2022(chip: Chip) -> tuple[str, str]:
    """(status, reason) under the Oct-2022 rule: controlled only if TPP >= 4800 AND I/O >= 600 GB/s."""
    t, io = tpp(chip), chip.io_bidir_gbs
    if t >= TPP_2022 and io >= IO_2022_GBS:
        return "controlled", f"TPP {t:,.0f} >= 4800 and I/O {io:,.0f} GB/s >= 600"
    if t >= TPP_2022:
        return "not controlled", f"TPP {t:,.0f} >= 4800 but I/O {io:,.0f} GB/s < 600"
    return "not controlled", f"TPP {t:,.0f} < 4800"


def classify_2023(chip: Chip) -> tuple[str, str]:
    """(status, reason) under the Oct-2023 rule: '3A090.a', '3A090.b' or 'not covered'.

    Non-datacenter parts (gaming GPUs) are judged on the TPP >= 4800 test only, as the spec reads the
    rule's note on them (exact Note wording unverified here); every catalogued chip is a datacenter part.
    """
    t = tpp(chip)
    pd = performance_density(chip)
    if t >= TPP_A:
        return "3A090.a", f"TPP {t:,.0f} >= 4800"
    if not chip.datacenter:
        return "not covered", f"TPP {t:,.0f} < 4800 and not a datacenter part"
    if t < TPP_A_DENSE:
        return "not covered", f"TPP {t:,.0f} < 1600"
    if pd is None:
        raise PlanError(
            f"chip {chip.key!r}: TPP {t:,.0f} is between 1600 and 4800, so the Oct-2023 rule needs its "
            "performance density; add die_area_mm2 to its catalogue entry"
        )
    if pd >= PD_A:
        return "3A090.a", f"TPP {t:,.0f} >= 1600 and PD {pd:.2f} >= 5.92"
    if t >= TPP_B_LOW and pd >= PD_B_LOW:
        return "3A090.b", f"TPP {t:,.0f} in [2400, 4800) and PD {pd:.2f} in [1.6, 5.92)"
    if pd >= PD_B_MID:
        return "3A090.b", f"TPP {t:,.0f} >= 1600 and PD {pd:.2f} in [3.2, 5.92)"
    why = "TPP < 2400" if t < TPP_B_LOW else "PD < 1.6"
    return "not covered", f"TPP {t:,.0f}, PD {pd:.2f}: {why} and PD < 3.2"


@dataclass(frozen=True)
class Overlay:
    id: str
    date: dt.date
    until: Optional[dt.date]
    chips: tuple[str, ...]
    applies_to: str
    china: str
    effect: str
    source: str

    def covers(self, chip_key: str, rule_2023: str) -> bool:
        return chip_key in self.chips or (self.applies_to != "" and self.applies_to == rule_2023)

    def active_on(self, day: dt.date) -> bool:
        return self.date <= day and (self.until is None or day < self.until)


@dataclass(frozen=True)
class Policy:
    rules_as_of: dt.date
    rules: tuple[dict[str, Any], ...]
    overlays: tuple[Overlay, ...]

    def rule_in_force(self, day: dt.date) -> str:
        """Which parametric rule governed exports on `day` ('none' before Oct 2022)."""
        current = "none"
        for rule in self.rules:
            if _as_date(rule["effective"]) <= day:
                current = rule["id"]
        return current


def _as_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise PlanError(f"bad date {value!r}: use YYYY-MM-DD") from None


def load_policy(path: Path = POLICY_FILE) -> Policy:
    with path.open("rb") as f:
        data = tomllib.load(f)
    overlays = tuple(
        Overlay(
            id=o["id"], date=_as_date(o["date"]), until=_as_date(o["until"]) if o.get("until") else None,
            chips=tuple(o.get("chips", ())), applies_to=o.get("applies_to", ""), china=o["china"],
            effect=o["effect"], source=o["source"],
        )
        for o in data.get("overlays", [])
    )
    rules = tuple(sorted(data["rules"], key=lambda r: _as_date(r["effective"])))
    return Policy(rules_as_of=_as_date(data["rules_as_of"]), rules=rules, overlays=overlays)


@dataclass
class Classification:
    chip: str
    tpp: float
    performance_density: Optional[float]
    rule_2022: str
    rule_2022_reason: str
    rule_2023: str
    rule_2023_reason: str
    as_of: str
    rule_in_force: str
    china_status: str
    overlays: list[dict[str, str]] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _china_status(chip: Chip, rule_in_force: str, r2022: str, r2023: str, active: list[Overlay]) -> str:
    """A one-line reading of what shipping this chip to China needed on the date (newest overlay wins)."""
    if active:
        return active[-1].china
    if chip.designer_country == "CN":
        return "PRC-made; US rules do not govern its sale"
    if rule_in_force == "none":
        return "no AI-chip rule yet"
    status = r2022 if rule_in_force == "oct-2022" else r2023
    return {
        "controlled": "licence required",
        "3A090.a": "licence required, presumption of denial",
        "3A090.b": "licence required (NAC notification available)",
    }.get(status, "no 3A090 licence requirement")


def classify(chip: Chip, as_of: str | dt.date | None = None, policy: Policy | None = None) -> Classification:
    """Both parametric classifications plus the overlays in force on `as_of` (default: the table's date)."""
    policy = policy or load_policy()
    day = _as_date(as_of) if as_of is not None else policy.rules_as_of
    r2022, why2022 = classify_2022(chip)
    r2023, why2023 = classify_2023(chip)
    in_force = policy.rule_in_force(day)
    # A class-wide overlay (e.g. all of 3A090.a) is about US exports, so it skips PRC-made chips.
    active = sorted(
        (o for o in policy.overlays
         if o.covers(chip.key, r2023) and o.active_on(day) and (o.chips or chip.designer_country != "CN")),
        key=lambda o: o.date,
    )
    note = ""
    if chip.designer_country == "CN":
        note = "PRC-designed and made: the 3A090 results say whether its parameters meet the thresholds, not that US rules control its sale."
    return Classification(
        chip=chip.key, tpp=tpp(chip), performance_density=performance_density(chip),
        rule_2022=r2022, rule_2022_reason=why2022, rule_2023=r2023, rule_2023_reason=why2023,
        as_of=day.isoformat(), rule_in_force=in_force,
        china_status=_china_status(chip, in_force, r2022, r2023, active),
        overlays=[
            {"id": o.id, "date": o.date.isoformat(), "until": o.until.isoformat() if o.until else "",
             "effect": o.effect, "source": o.source}
            for o in active
        ],
        note=note,
    )
