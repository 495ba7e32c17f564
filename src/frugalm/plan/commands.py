"""`frugalm plan`: the planner's command line (argument parsing only; the work is in frugalm.plan's API).

    frugalm plan --model deepseek-v3 --tokens 14.8T --gpu h800 --count 2048 [--layout published] [--mfu 0.35] [--json]
    frugalm plan --model deepseek-v3 --tokens 14.8T --count 2048 --compare h800,h100,h20,ascend-910b --chart cmp.png
    frugalm plan chips [--as-of 2025-06-01] [--json]
    frugalm plan claim --preset deepseek-v3 [--json]
    frugalm plan calibrate --run OUT --gpu h100 --count 8 [--json]
"""

from __future__ import annotations

import argparse
import sys

_FLOPS_METHODS = ("detailed", "6nd", "6nd+attention")


def _add_output(p: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else False
    p.add_argument("--json", action="store_true", default=default, help="print one JSON object instead of a table")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1] if __doc__ else None
    parser.set_defaults(plan_action=None)
    parser.add_argument("--config", help="TOML with [plan], [layout] and [comm] sections")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set layout.pp=16 --set comm.max_nodes_per_token=4")
    parser.add_argument("--model", help="preset (deepseek-v3, llama-3.1-405b, ...), HF config.json or folder, or TOML")
    parser.add_argument("--tokens", help="training tokens, e.g. 14.8T, 300B, 1.5e12")
    parser.add_argument("--gpu", help="chip from the catalogue (see `frugalm plan chips`)")
    parser.add_argument("--count", type=int, help="number of GPUs")
    parser.add_argument("--layout", help="'auto' (search), 'published' (the preset's), or k=v,... e.g. dp=128,pp=16,ep=64,schedule=dualpipe")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--mfu", type=float, help="whole-run MFU vs dense BF16 peak (default 0.35)")
    speed.add_argument("--efficiency", type=float, help="fraction of peak while computing; MFU is then predicted")
    parser.add_argument("--seq-len", type=int, dest="seq_len", help="sequence length (default: the model's, else 4096)")
    parser.add_argument("--batch", type=int, help="global batch in sequences (default: the preset's, else ~4M tokens)")
    parser.add_argument("--price", type=float, help="USD per GPU-hour (default: the catalogue's dated price)")
    parser.add_argument("--flops", choices=_FLOPS_METHODS, help="what counts as model FLOPs (default detailed)")
    parser.add_argument("--chips", action="append", default=[], metavar="FILE", help="extra chip catalogue (TOML/YAML), repeatable")
    parser.add_argument("--compare", help="comma-separated chips: the same run on each fleet")
    parser.add_argument("--chart", help="with --compare: write a PNG chart here")
    _add_output(parser, suppress=False)

    sub = parser.add_subparsers(dest="plan_sub", metavar="{chips,claim,calibrate}")
    chips = sub.add_parser("chips", help="the chip catalogue with TPP, performance density and export classification")
    chips.set_defaults(plan_action="chips")
    chips.add_argument("--as-of", dest="as_of", help="date for the policy overlays (default: the table's rules_as_of)")
    chips.add_argument("--chips", action="append", default=argparse.SUPPRESS, metavar="FILE", help="extra chip catalogue")
    _add_output(chips, suppress=True)

    claim = sub.add_parser("claim", help="implied MFU and cost of a published training run")
    claim.set_defaults(plan_action="claim")
    claim.add_argument("--preset", help="deepseek-v3, llama-3.1-405b, llama-3.1-70b, llama-3.1-8b")
    claim.add_argument("--list", action="store_true", help="list the claim presets")
    _add_output(claim, suppress=True)

    cal = sub.add_parser("calibrate", help="achieved MFU of a frugalm run from its metrics.jsonl")
    cal.set_defaults(plan_action="calibrate")
    src = cal.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder holding metrics.jsonl and config.toml")
    src.add_argument("--metrics", help="a metrics.jsonl file")
    cal.add_argument("--config", dest="run_config", help="the run's config.toml (default: next to metrics.jsonl)")
    cal.add_argument("--model", dest="cal_model", help="model override (preset, config.json or TOML)")
    hw = cal.add_mutually_exclusive_group()
    hw.add_argument("--gpu", dest="cal_gpu", help="chip the run used (catalogue name)")
    hw.add_argument("--peak-tflops", type=float, dest="peak_tflops", help="peak of the hardware in TFLOPS (default: the run's measured peak_flops.json)")
    cal.add_argument("--count", type=int, dest="cal_count", default=1, help="devices in the run (default 1)")
    cal.add_argument("--precision", default="bf16", choices=("bf16", "fp8", "fp16"), help="peak to measure against (default bf16)")
    cal.add_argument("--seq-len", type=int, dest="cal_seq_len", help="sequence length if the config lacks it")
    cal.add_argument("--warmup", type=float, default=0.2, help="share of logged steps to skip as warm-up (default 0.2)")
    cal.add_argument("--per-gpu", action="store_true", help="tokens_per_s in the metrics is per device, not for the whole run")
    _add_output(cal, suppress=True)


def _plan_inputs(args: argparse.Namespace):
    """Merge --config, the flags and --set into PlanConfig, the layout keys to fix, and CommConfig."""
    from frugalm.config import ConfigError, apply_overrides, from_dict, load_toml
    from frugalm.plan.comm import CommConfig
    from frugalm.plan.layout import make_layout, parse_layout
    from frugalm.plan.planner import PlanConfig

    raw = load_toml(args.config) if args.config else {}
    unknown = sorted(set(raw) - {"plan", "layout", "comm"})
    if unknown:
        raise ConfigError(f"{args.config}: unknown section(s) {', '.join(unknown)}; valid: plan, layout, comm")
    plan = raw.setdefault("plan", {})
    for flag, key in (("model", "model"), ("tokens", "tokens"), ("gpu", "gpu"), ("count", "count"),
                      ("mfu", "mfu"), ("efficiency", "efficiency"), ("seq_len", "seq_len"), ("batch", "global_batch"),
                      ("price", "price_usd_per_hour"), ("flops", "flops_method")):
        value = getattr(args, flag, None)
        if value is not None:
            plan[key] = value
    if args.mfu is not None:
        plan.pop("efficiency", None)
    if args.efficiency is not None:
        plan.pop("mfu", None)
    if args.chips:
        plan["chips"] = list(plan.get("chips", [])) + list(args.chips)
    if args.layout:
        if args.layout.strip() in ("auto", "published"):
            plan["layout"] = args.layout.strip()
        else:
            raw.setdefault("layout", {}).update(parse_layout(args.layout))
    apply_overrides(raw, args.set)
    cfg = from_dict(PlanConfig, raw.get("plan", {}), "plan")
    fixed = raw.get("layout") or None
    if fixed:
        checked = make_layout(fixed)  # type-checks the given keys
        fixed = {k: getattr(checked, k) for k in fixed}
    comm = from_dict(CommConfig, raw.get("comm", {}), "comm")
    return cfg, fixed, comm


def _run_plan(args: argparse.Namespace) -> int:
    from frugalm.plan import report
    from frugalm.plan.chips import load_catalogue
    from frugalm.plan.errors import PlanError
    from frugalm.plan.planner import compare, plan_run

    cfg, fixed, comm = _plan_inputs(args)
    catalogue = load_catalogue(cfg.chips)
    if args.compare:
        gpus = [g.strip() for g in args.compare.split(",") if g.strip()]
        if not gpus:
            raise PlanError("--compare needs a comma-separated list of chips")
        results = compare(cfg, gpus, fixed, comm, catalogue)
        chart = None
        if args.chart:
            try:
                chart = str(report.compare_chart(results, gpus, args.chart))
            except ValueError as e:
                raise PlanError(str(e)) from None
        if args.json:
            items = [
                {"chip": g, "error": str(r)} if isinstance(r, PlanError) else r.to_dict()
                for g, r in zip(gpus, results)
            ]
            print(report.to_json({"compare": items, "chart": chart}))
        else:
            print(report.format_compare(results, gpus))
            if chart:
                print(f"chart: {chart}")
        return 0 if any(not isinstance(r, PlanError) for r in results) else 2
    if args.chart:
        raise PlanError("--chart draws a --compare result; add --compare chip1,chip2,...")
    result = plan_run(cfg, fixed, comm, catalogue)
    print(report.to_json(result.to_dict()) if args.json else report.format_plan(result))
    return 0


def _run_chips(args: argparse.Namespace) -> int:
    from frugalm.plan import report
    from frugalm.plan.chips import load_catalogue
    from frugalm.plan.rules import classify, load_policy

    catalogue = load_catalogue(getattr(args, "chips", []) or [])
    policy = load_policy()
    rows = []
    for chip in catalogue:
        c = classify(chip, args.as_of, policy)
        rows.append({
            "key": chip.key, "name": chip.name, "vendor": chip.vendor,
            **{f"{p}_tflops": v for p, v in chip.peaks_tflops.items() if p != "int8"},
            "int8_tops": chip.peaks_tflops["int8"], "hbm_gb": chip.hbm_gb, "hbm_tbps": chip.hbm_tbps,
            "scale_up_bidir_gbs": chip.scale_up_bidir_gbs, "io_bidir_gbs": chip.io_bidir_gbs,
            "scale_up_domain": chip.scale_up_domain, "scale_out_gbps": chip.scale_out_gbps,
            "die_area_mm2": chip.die_area_mm2, "tdp_w": chip.tdp_w, "price_usd_per_hour": chip.price_usd_per_hour,
            "price_range": [chip.price_low, chip.price_high], "price_date": chip.price_date,
            "tpp": c.tpp, "performance_density": c.performance_density, "rule_2022": c.rule_2022,
            "rule_2022_reason": c.rule_2022_reason, "rule_2023": c.rule_2023, "rule_2023_reason": c.rule_2023_reason,
            "china_status": c.china_status, "overlays": c.overlays, "note": c.note, "sources": chip.sources,
        })
    as_of = classify(next(iter(catalogue)), args.as_of, policy).as_of
    if args.json:
        print(report.to_json({"rules_as_of": policy.rules_as_of.isoformat(), "as_of": as_of, "chips": rows}))
    else:
        print(report.format_chips(rows, as_of))
        print(f"\nTPP = dense TOPS x bits (max over precisions); PD = TPP / die mm2. Policy table as of {policy.rules_as_of}.")
    return 0


def _run_claim(args: argparse.Namespace) -> int:
    from frugalm.plan import report
    from frugalm.plan.claims import check_claim, claim_presets
    from frugalm.plan.errors import PlanError

    if args.list:
        presets = claim_presets()
        if args.json:
            print(report.to_json({k: p.title for k, p in presets.items()}))
        else:
            print(report.table([(k, p.title) for k, p in presets.items()]))
        return 0
    if not args.preset:
        raise PlanError("plan claim needs --preset NAME (or --list)")
    c = check_claim(args.preset)
    print(report.to_json(c.to_dict()) if args.json else report.format_claim(c))
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from frugalm.plan import report
    from frugalm.plan.calibrate import calibrate

    r = calibrate(
        args.run or args.metrics, model=args.cal_model, config=args.run_config, gpu=args.cal_gpu,
        count=args.cal_count, peak_tflops=args.peak_tflops, precision=args.precision, seq_len=args.cal_seq_len,
        warmup_fraction=args.warmup, throughput_per_gpu=args.per_gpu,
    )
    print(report.to_json(r.to_dict()) if args.json else report.format_calibration(r))
    return 0


def run(args: argparse.Namespace) -> int:
    from frugalm.config import ConfigError

    action = {"chips": _run_chips, "claim": _run_claim, "calibrate": _run_calibrate}.get(args.plan_action, _run_plan)
    try:
        return action(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"frugalm plan: error: {e}", file=sys.stderr)
        return 2
