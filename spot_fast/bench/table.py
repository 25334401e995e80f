"""The bench's table: every row's ms/step, img/s, spread, memory, MFU and speed-up, then the
mask check, the data rates, the contended rows, the sweep and where the peaks came from."""
from __future__ import annotations


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"spot-fast bench: preset {cfg['preset']}, batch {cfg['batch']}, device {cfg['device']}, "
             f"{result['threads']} threads, fast rows {cfg['precision']}{' + compile' if cfg['compile'] == 'on' else ''}, "
             f"{cfg['repeats']} repeats (median, [min, max])",
             f"reference rows: {result['reference']}",
             f"{'section':<8} {'row':<14} {'ms/step':>10} {'spread ms':>17} {'img/s':>8} {'peak GiB':>8} "
             f"{'MFU':>6} {'speed-up':>9}",
             "-" * 88]
    peaks = {}
    for sec, body in result["sections"].items():
        if "paths" not in body:
            continue
        for row, r in body["paths"].items():
            peaks[r["precision"]] = r["peak_source"]
            ratio = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
            mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"{sec:<8} {row:<14} {r['ms_per_step']:>10.0f} "
                         f"{'[%.0f, %.0f]' % (1e3 * r['min_s'], 1e3 * r['max_s']):>17} {r['img_s']:>8.2f} "
                         f"{mem:>8} {mfu:>6} {ratio:>8.2f}x")
        for name, check in body.get("mask_check", {}).items():
            p = body["paths"]
            lines.append(f"{'':<8} {name} vs serial {p['serial']['median_s'] / p[name]['median_s']:.2f}x; "
                         f"masks vs serial fp32: max |diff| {check['max_abs_mask_diff']:.2e}, "
                         f"argmax agreement {100 * check['argmax_agreement']:.2f}%")
    sections = result["sections"]
    if "data" in sections:
        lines.append("data     " + "; ".join(
            f"{k}: {v['img_s']:.0f} img/s" + (f" {v['gb_s']:.3f} GB/s" if v.get("gb_s") else "")
            if "img_s" in v else f"{k}: {_wait(v)}" for k, v in sections["data"].items()))
    if "contended" in sections:
        c = sections["contended"]
        lines.append(f"contended stage1 spot-fast ({c.get('precision', 'fp32')}), beside {c['neighbours']} busy "
                     f"processes (img/s, share of quiet, cores the step got, threads)"
                     f"{'; Linux shares the CPU between sessions first (autogroup)' if c.get('autogroup') else ''}:")
        for name, r in c["rows"].items():
            cells = [f"quiet {r['quiet_img_s']:.1f} ({r['quiet_cores']:.2f} cores, {_threads(r['threads']['quiet'])})"]
            cells += [f"{kind}: {x['img_s']:.1f} {100 * x['share']:.0f}% ({x['cores']:.2f} of "
                      f"{x['fair_cores']:.2f} fair cores, {100 * x['of_fair_share']:.0f}% of the fair-share speed, "
                      f"{_threads(r['threads'][kind])})" for kind, x in r["contended"].items()]
            lines.append(f"  {name:<14} " + "; ".join(cells))
    if "sweep" in sections:
        from spot_fast.bench.sweep import format_sweep_table
        lines.append("sweep: " + format_sweep_table(sections["sweep"]))
    if cfg["device"] == "cpu":
        lines.append("GPU rows: not measured (no CUDA device here); run `spot-fast bench` on a GPU.")
    lines += [f"MFU peak {p}: {note}" for p, note in peaks.items()]
    lines.append("Speed-up: reference median / row median.")
    return "\n".join(lines)


def _wait(v: dict) -> str:
    return f"{100 * v['share']:.1f}% of step time" if v.get("share") is not None else "n/a"


def _threads(n) -> str:
    """A block kind's thread counts: one number, or one per round where they differed."""
    return f"{n} thr" if not isinstance(n, list) else "/".join(map(str, n)) + " thr"
