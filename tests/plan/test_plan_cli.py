"""`frugalm plan ...`: tables, --json objects, the chart, and one-line errors instead of tracebacks."""

import argparse
import json
import subprocess
import sys

import pytest

from frugalm.plan import commands


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="frugalm plan")
    commands.configure(parser)
    rc = commands.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


V3 = ["--model", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--count", "2048"]


def test_plan_json_has_the_promised_keys(capsys):
    rc, out, _ = _run(V3 + ["--layout", "published", "--mfu", "0.35", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0
    for key in ("flops_per_token", "total_flops", "gpu_hours", "days", "cost_usd", "memory_per_gpu_gb",
                "comm_seconds_per_step", "compute_seconds_per_step", "bubble_fraction"):
        assert isinstance(d[key], (int, float)), key
    assert d["layout"]["schedule"] == "dualpipe" and d["price_date"] == "2024-12"


def test_plan_table_and_config_file_with_overrides(tmp_path, capsys):
    rc, out, _ = _run(V3 + ["--layout", "published"], capsys)
    assert rc == 0 and "GPU-hours" in out and "assumed MFU 35%" in out and "dualpipe" in out
    cfg = tmp_path / "plan.toml"
    cfg.write_text('[plan]\nmodel = "deepseek-v3"\ntokens = "14.8T"\ngpu = "h800"\ncount = 2048\nmfu = 0.3\n\n'
                   '[layout]\npp = 8\nschedule = "dualpipe"\n\n[comm]\nmax_nodes_per_token = 2\n')
    rc, out, _ = _run(["--config", str(cfg), "--set", "plan.mfu=0.4", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["mfu"] == 0.4 and d["layout"]["pp"] == 8 and d["layout_mode"] == "partial"
    assert d["comm"]["nodes_reached"] <= 2.0 or d["layout"]["ep"] <= 8


def test_compare_json_and_chart(tmp_path, capsys):
    png = tmp_path / "cmp.png"
    rc, out, _ = _run(["--model", "moonlight-16b-a3b", "--tokens", "1T", "--count", "8", "--efficiency", "0.4",
                       "--compare", "h100,h800,ascend-910b", "--chart", str(png), "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and [c["chip"] for c in d["compare"]] == ["h100", "h800", "ascend-910b"]
    assert d["chart"] == str(png) and png.stat().st_size > 10_000
    rc, out, _ = _run(["--model", "moonlight-16b-a3b", "--tokens", "1T", "--count", "8", "--compare", "h100,h20"], capsys)
    assert rc == 0 and "chip" in out.splitlines()[0] and "h20" in out


def test_chips_claim_calibrate_subcommands(tmp_path, capsys):
    rc, out, _ = _run(["chips", "--json"], capsys)
    chips = {c["key"]: c for c in json.loads(out)["chips"]}
    assert rc == 0 and chips["h20"]["rule_2023"] == "not covered" and chips["h800"]["rule_2022"] == "not controlled"
    assert all({"tpp", "performance_density", "rule_2022", "rule_2023"} <= set(c) for c in chips.values())
    rc, out, _ = _run(["chips", "--as-of", "2025-05-01"], capsys)
    assert rc == 0 and "is-informed" in out
    rc, out, _ = _run(["claim", "--preset", "deepseek-v3", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and round(d["mfu_6nd"], 3) == 0.346 and round(d["cost_usd"]) == 5_576_000
    rc, out, _ = _run(["claim", "--preset", "llama-3.1-405b"], capsys)
    assert rc == 0 and "34.5%" in out
    rc, out, _ = _run(["claim", "--list"], capsys)
    assert rc == 0 and "deepseek-v3" in out
    (tmp_path / "config.toml").write_text('[model]\nhidden_size = 64\nintermediate_size = 128\nmoe_intermediate_size = 32\n'
                                          'num_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 4\n'
                                          'n_routed_experts = 8\nnum_experts_per_tok = 2\nn_group = 4\ntopk_group = 2\n'
                                          'vocab_size = 256\n\n[train]\nseq_len = 64\n')
    (tmp_path / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": i, "loss": 3.0, "lr": 1e-3, "tokens": 64 * i, "tokens_per_s": 2000.0}) for i in range(1, 6)))
    rc, out, _ = _run(["calibrate", "--run", str(tmp_path), "--peak-tflops", "0.2", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["tokens_per_s"] == 2000.0 and 0 < d["mfu"] < 1


@pytest.mark.parametrize("argv,msg", [
    (["--model", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h900", "--count", "8"], "unknown chip 'h900'"),
    (V3 + ["--layout", "dp=100,pp=16,ep=64,schedule=dualpipe,zero=1,recompute=full,tp=1"], "impossible layout"),
    (V3 + ["--layout", "dp=128,pp=16,ep=64,tp=1,schedule=dualpipe,zero=1,recompute=none"], "does not fit"),
    (["--model", "deepseek-v3", "--tokens", "1T", "--gpu", "h100", "--count", "8"], "does not fit on 8 x h100"),
    (V3[:2] + ["--tokens", "many"] + V3[4:], "cannot read tokens"),
    (V3 + ["--layout", "dp=128,warp=9"], "unknown layout key 'warp'"),
    (V3 + ["--set", "plan.colour=blue"], "unknown key(s) colour"),
    (["--model", "no-such-model", "--tokens", "1T", "--count", "8"], "unknown model"),
    (V3 + ["--chart", "x.png"], "--chart draws a --compare"),
    (["claim", "--preset", "gpt-5"], "unknown claim preset"),
    (["calibrate", "--metrics", "/nonexistent/metrics.jsonl", "--gpu", "h100", "--model", "deepseek-v3"], "metrics file not found"),
])
def test_bad_input_is_one_clear_line(argv, msg, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("frugalm plan: error:") and msg in err and "Traceback" not in err


def test_registered_in_the_frugalm_command():
    proc = subprocess.run([sys.executable, "-m", "frugalm", "plan", "--model", "deepseek-v3", "--tokens", "1T",
                           "--gpu", "nosuch", "--count", "8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown chip 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
