"""Chip catalogue (sources for every figure) and the export-control classification."""

import sys

import pytest

from frugalm.plan.chips import BUILTIN_CATALOGUE, load_catalogue, missing_sources
from frugalm.plan.errors import PlanError
from frugalm.plan.rules import classify, classify_2022, classify_2023, load_policy, performance_density, tpp

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REQUIRED = ("h100", "h800", "h20", "a100", "a800", "h200", "b200", "mi300x", "ascend-910b", "ascend-910c", "gaudi3")


@pytest.fixture(scope="module")
def cat():
    return load_catalogue()


def test_catalogue_has_the_required_chips_with_sources_and_no_typed_in_tpp():
    raw = tomllib.loads(BUILTIN_CATALOGUE.read_text())["chips"]
    for key in REQUIRED:
        assert key in raw, key
    for key, table in raw.items():
        assert missing_sources(table) == [], f"{key}: figures without a source"
        assert not {"tpp", "performance_density", "rule_2022", "rule_2023"} & set(table), key
        if any(k in table for k in ("price_low", "price_typical", "price_high")):
            assert table.get("price_date"), f"{key}: a price needs its date"


@pytest.mark.parametrize("key,expected", [
    ("h100", 15832), ("h800", 15832), ("h200", 15832), ("a100", 4992), ("a800", 4992), ("h20", 2368),
    ("b200", 36000), ("mi300x", 20919), ("gaudi3", 29360), ("ascend-910b", 5120), ("ascend-910c", 12032),
])
def test_tpp_as_in_the_spec(cat, key, expected):
    assert tpp(cat.get(key)) == pytest.approx(expected, abs=1.0)


def test_performance_density(cat):
    assert performance_density(cat.get("h100")) == pytest.approx(19.4, abs=0.1)
    assert performance_density(cat.get("a100")) == pytest.approx(6.0, abs=0.1)
    assert performance_density(cat.get("h20")) == pytest.approx(2.9, abs=0.05)
    assert performance_density(cat.get("ascend-910b")) == pytest.approx(7.7, abs=0.1)
    assert performance_density(cat.get("mi300x")) is None  # no die area catalogued; not needed


def test_oct_2022_rule(cat):
    assert classify_2022(cat.get("h100"))[0] == "controlled"
    assert classify_2022(cat.get("a100"))[0] == "controlled"
    for key in ("h800", "a800"):
        status, reason = classify_2022(cat.get(key))
        assert status == "not controlled" and "I/O 400 GB/s < 600" in reason
    assert classify_2022(cat.get("h20")) == ("not controlled", "TPP 2,368 < 4800")


def test_oct_2023_rule(cat):
    for key in ("h100", "h800", "a100", "a800", "h200", "b200"):
        assert classify_2023(cat.get(key))[0] == "3A090.a", key
    status, reason = classify_2023(cat.get("h20"))
    assert status == "not covered"
    assert "TPP < 2400" in reason and "PD < 3.2" in reason
    assert classify_2023(cat.get("ascend-910b"))[0] == "3A090.a"  # parameters meet it (PD 7.7 >= 5.92)


def _chip_file(tmp_path, name, **fields):
    base = dict(name=name, vendor="Test", hbm_gb=64, hbm_tbps=2.0, scale_up_bidir_gbs=400, scale_up_domain=8,
                scale_out_gbps=200, tdp_w=300)
    base.update(fields)
    body = "\n".join(f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in base.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(f"[chips.{name}]\n{body.replace(chr(39), chr(34))}\n")
    return path


@pytest.mark.parametrize("bf16,area,expected", [
    (187.5, 1000.0, "3A090.b"),  # TPP 3000, PD 3.0: the 2400-4800 / 1.6-5.92 box
    (125.0, 500.0, "3A090.b"),  # TPP 2000, PD 4.0: TPP >= 1600 with PD in [3.2, 5.92)
    (125.0, 300.0, "3A090.a"),  # TPP 2000, PD 6.7 >= 5.92
    (125.0, 1000.0, "not covered"),  # TPP 2000, PD 2.0
    (90.0, 100.0, "not covered"),  # TPP 1440 < 1600
    (312.5, 10000.0, "3A090.a"),  # TPP 5000 >= 4800 whatever the area
])
def test_oct_2023_branches_on_user_chips(tmp_path, bf16, area, expected):
    cat = load_catalogue([str(_chip_file(tmp_path, "probe", bf16_tflops=bf16, die_area_mm2=area))])
    assert classify_2023(cat.get("probe"))[0] == expected


def test_density_needed_but_missing_is_a_clear_error(tmp_path):
    cat = load_catalogue([str(_chip_file(tmp_path, "noarea", bf16_tflops=150.0))])
    with pytest.raises(PlanError, match="die_area_mm2"):
        classify_2023(cat.get("noarea"))


def test_dated_overlays(cat):
    policy = load_policy()
    h20 = cat.get("h20")
    assert classify(h20, "2024-06-01", policy).china_status == "no 3A090 licence requirement"
    assert classify(h20, "2025-05-01", policy).china_status == "licence required (is-informed letter)"
    assert classify(h20, "2025-09-01", policy).china_status.startswith("licensed, 15%")
    assert "25%" in classify(cat.get("h200"), "2025-12-08", policy).china_status
    assert classify(cat.get("h100"), "2025-02-01", policy).china_status == "barred (Tier 3)"  # AI Diffusion rule
    assert classify(cat.get("h100"), "2025-06-01", policy).china_status.startswith("licence required")  # rescinded
    assert classify(cat.get("ascend-910b"), "2025-02-01", policy).china_status.startswith("PRC-made")
    assert classify(cat.get("h800"), "2023-01-01", policy).rule_in_force == "oct-2022"
    assert classify(cat.get("h800"), "2023-01-01", policy).china_status == "no 3A090 licence requirement"
    assert classify(cat.get("h800"), "2024-01-01", policy).china_status.startswith("licence required")
    assert classify(cat.get("h800"), "2021-01-01", policy).rule_in_force == "none"
    assert classify(h20, None, policy).as_of == policy.rules_as_of.isoformat()
    with pytest.raises(PlanError, match="YYYY-MM-DD"):
        classify(h20, "June 2025", policy)


def test_user_chip_files_toml_and_yaml(tmp_path):
    path = _chip_file(tmp_path, "mychip", bf16_tflops=500.0, fp8_tflops=1000.0, die_area_mm2=600.0, aliases=["mc"])
    cat = load_catalogue([str(path)])
    chip = cat.get("MC")
    assert chip.key == "mychip" and chip.peak_tflops("fp8") == 1000.0 and chip.sources
    yaml = pytest.importorskip("yaml")
    ypath = tmp_path / "chips.yaml"
    ypath.write_text(yaml.safe_dump({"chips": {"h100": {"name": "cheaper H100", "vendor": "NVIDIA", "bf16_tflops": 989.5,
                                                        "hbm_gb": 80, "hbm_tbps": 3.35, "scale_up_bidir_gbs": 900,
                                                        "scale_up_domain": 8, "scale_out_gbps": 400, "tdp_w": 700,
                                                        "price_typical": 1.5, "price_date": "2026-06"}}}))
    cat = load_catalogue([str(ypath)])
    assert cat.get("h100").price_usd_per_hour == 1.5 and len(cat) == len(load_catalogue())


def test_bad_chip_input_messages(tmp_path, cat):
    with pytest.raises(PlanError, match=r"unknown chip 'h80'.*Did you mean.*h800"):
        cat.get("h80")
    with pytest.raises(PlanError, match="no fp8 peak"):
        cat.get("a100").peak_tflops("fp8")
    bad = tmp_path / "bad.toml"
    bad.write_text('[chips.x]\nname = "x"\nvendor = "v"\nhbm_gb = 1\nbogus = 3\n')
    with pytest.raises(PlanError, match="unknown key.*bogus"):
        load_catalogue([str(bad)])
    with pytest.raises(PlanError, match="not found"):
        load_catalogue([str(tmp_path / "missing.toml")])
    flat = tmp_path / "flat.toml"
    flat.write_text('name = "x"\n')
    with pytest.raises(PlanError, match="top-level 'chips' table"):
        load_catalogue([str(flat)])
