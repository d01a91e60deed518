"""Render benchmarks/results/*.json as the markdown table of figures (ours, baseline, ratio,
goal met?).   .venv/bin/python benchmarks/report.py [--quick]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = "--quick" in sys.argv


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}{'_quick' if QUICK else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def mmm(s: dict | None, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    if not s or s.get("median") is None:
        return "n/a"
    f = lambda x: fmt.format(x * scale)  # noqa: E731
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"


def yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


rows: list[tuple[str, str, str, str, str, str]] = []


def row(fig: str, ours: str, base: str, ratio: str, goal: str, met: bool | None) -> None:
    rows.append((fig, ours, base, ratio, goal, yes(met)))


# 1 -----------------------------------------------------------------------------------
OWNER = {"lightning": "Lightning's", "hf": "the HF Trainer's"}


def ratio(entry: dict) -> str:
    """The paired ratio (per repeat, against that repeat's untracked fit), median [min-max];
    the ratio of medians where an older result has no pairs."""
    paired = entry.get("paired_ratio")
    text = (mmm(paired, fmt="{:.3f}") + " paired") if paired else f"{entry['ratio']:.3f}"
    cpu = entry.get("thread_cpu_paired_ratio")
    if cpu:
        text += f"; training-thread CPU {mmm(cpu, fmt='{:.3f}')}"
    return text


for fw, tag in (("lightning", ""), ("lightning", "_w1024"), ("hf", ""), ("hf", "_w1024")):
    ours, peers = load(f"fig1_{fw}_chronicle{tag}"), load(f"fig1_{fw}_peers{tag}")
    if ours:
        steps = ours["steps"] * (2 if fw == "lightning" else 1)
        what = f"1 {fw} fit ({steps} steps, width {ours.get('width', 256)})"
        base = ours["variants"]["none"]["fit_s"]
        if "noop-callback" in ours["variants"]:
            e = ours["variants"]["noop-callback"]
            row(
                f"{what}, an empty callback with the same hooks (s)",
                mmm(e["fit_s"], fmt="{:.3f}"),
                "no tracking " + mmm(base, fmt="{:.3f}"),
                f"{ratio(e)} ({OWNER[fw]} own per-callback cost)",
                "(reference)",
                None,
            )
        for v in ("chronicle-embedded", "chronicle-http"):
            e = ours["variants"].get(v)
            if not e:
                continue
            hb = e["hook_breakdown_median_ms"]
            fixed = sum(
                hb.get(k, 0)
                for k in (
                    "on_fit_start",
                    "on_fit_end",
                    "on_train_begin",
                    "on_train_end",
                    "on_init_end",
                )
            )
            saves = hb.get("on_save", 0)
            per_step_us = (sum(hb.values()) - fixed - saves) / steps * 1e3
            row(
                f"{what}, {v} (s)",
                mmm(e["fit_s"], fmt="{:.3f}"),
                "no tracking " + mmm(base, fmt="{:.3f}"),
                f"{ratio(e)} (in our hooks: {e['hook_fraction_of_baseline'] * 100:.1f}% ="
                f" {fixed:.0f} ms per fit + {per_step_us:.0f} us/step"
                + (
                    f" + {saves / max(1, e['hook_calls'].get('on_save', 1)):.0f} ms/save"
                    if saves
                    else ""
                )
                + ")",
                "<= 1.01",
                e.get("paired_ratio", {}).get("median", e["ratio"]) <= 1.01,
            )
    if peers and "mlflow" in peers["variants"]:
        e = peers["variants"]["mlflow"]
        steps = peers["steps"] * (2 if fw == "lightning" else 1)
        row(
            f"1 {fw} fit ({steps} steps, width {peers.get('width', 256)}), MLflow logger (s)",
            mmm(e["fit_s"], fmt="{:.3f}"),
            "no tracking " + mmm(peers["variants"]["none"]["fit_s"], fmt="{:.3f}"),
            ratio(e),
            "(peer)",
            None,
        )

# 2 -----------------------------------------------------------------------------------
ours, peers = load("fig2_checkpoint_chronicle"), load("fig2_checkpoint_peers")
for size in (ours or {}).get("sizes", {}):
    for v in ("chronicle-http", "chronicle-embedded"):
        r = ours["sizes"][size].get(v)
        if not r:
            continue
        up = r["upload_stats_ms"]
        worst = max(up["max"], r["hooks_per_ckpt_ms"])
        peer = ""
        if peers and size in peers["sizes"]:
            p = peers["sizes"][size]
            if "mlflow" in p:
                peer += f"MLflow {mmm(p['mlflow']['after_save_stats_ms'], fmt='{:.0f}')} ms"
            if "wandb-offline" in p:
                peer += (
                    f"; W&B offline "
                    f"{mmm(p['wandb-offline']['log_artifact_stats_ms'], fmt='{:.0f}')} ms"
                )
        ratio = ""
        if peers and size in peers["sizes"] and "mlflow" in peers["sizes"][size]:
            mlflow_ms = peers["sizes"][size]["mlflow"]["after_save_stats_ms"]["median"]
            ratio = f"{mlflow_ms / max(r['hooks_per_ckpt_ms'], 1e-3):.0f}x less than MLflow"
        row(
            f"2 blocked per {size} checkpoint, {v} (ms)",
            f"upload_asset {mmm(up, fmt='{:.2f}')}; all hooks/ckpt {r['hooks_per_ckpt_ms']:.2f}",
            peer or "n/a",
            ratio,
            "<= 10 ms",
            worst <= 10,
        )

# 3 -----------------------------------------------------------------------------------
up = load("fig3_upload")
for size, s in (up or {}).get("sizes", {}).items():
    cr = s.get("chronicle_client_rss_growth_mib", {}).get("max")
    sr = s.get("chronicle_server_rss_growth_mib", {}).get("max")
    ours_s = (
        f"{s['chronicle_mib_per_s']:.0f} MiB/s ({mmm(s['chronicle_s'], fmt='{:.2f}')} s); "
        f"RSS +{cr:.0f}/+{sr:.0f} MiB client/server"
    )
    base = f"cp+sync {s['cp_mib_per_s']:.0f} MiB/s, cp {s['cp_nosync_mib_per_s']:.0f} MiB/s"
    if "mlflow_mib_per_s" in s:
        base += (
            f"; MLflow {s['mlflow_mib_per_s']:.0f} MiB/s (RSS "
            f"+{s['mlflow_client_rss_growth_mib']['max']:.0f}/"
            f"+{s['mlflow_server_rss_growth_mib']['max']:.0f} MiB)"
        )
    row(
        f"3 upload {size}",
        ours_s,
        base,
        f"{s['chronicle_vs_cp']:.2f}x cp+sync, {s['chronicle_vs_cp_nosync']:.2f}x cp",
        ">= 0.7x cp; RSS <= 100 MiB",
        s["chronicle_vs_cp"] >= 0.7 and cr <= 100 and sr <= 100,
    )

# 4 -----------------------------------------------------------------------------------
srv = load("fig4_server")
if srv:
    sm = srv["summary"]
    for b in ("sqlite", "postgres", "sqlite+nolane", "postgres+nolane"):
        if b not in sm:
            continue
        label = b if "+" not in b else f"{b} (the heartbeat lane off: the server before it)"
        for n, s in sm[b].items():
            peer_key = "mlflow-postgres" if b.startswith("postgres") else "mlflow"
            peer = sm.get(peer_key, {}).get(n)
            base = (
                f"{peer_key} set-tag {peer['rps']['median']:.0f}/s p99 "
                f"{peer['p99_ms']['median']:.1f} ms"
                if peer
                else "n/a"
            )
            ratio = f"{s['rps']['median'] / peer['rps']['median']:.2f}x" if peer else ""
            goal = ">= 2000/s, p99 <= 50 ms" if n == "64" else ""
            met = (
                (s["rps"]["median"] >= 2000 and s["p99_ms"]["median"] <= 50) if n == "64" else None
            )
            if "+" in b and n != "64":
                continue
            row(
                f"4 heartbeats, {label}, {n} clients",
                f"{mmm(s['rps'], fmt='{:.0f}')}/s, p50 {s['p50_ms']['median']:.1f} ms, p99 "
                f"{s['p99_ms']['median']:.1f} ms (loadgen {s['loadgen_cpu_cores']['median']:.2f}"
                f" cores, server {s['server_cpu_cores']['median']:.2f})",
                base,
                ratio,
                goal,
                met,
            )

# 5 -----------------------------------------------------------------------------------
sw = load("fig5_sweep")
for b, r in (sw or {}).get("backends", {}).items():
    row(
        f"5 sweep {r['runs']:,} runs / {r['owed']:,} owed, {b} (ms)",
        mmm(r["sweep_s"], 1e3),
        f"idle sweep {mmm(r['idle_sweep_s'], 1e3)}",
        "",
        "<= 200 ms",
        r["sweep_s"]["median"] <= 0.2,
    )
    if "proposed_setbased_sweep_s" in r:
        row(
            f"5 sweep, {b}, the set-based statements alone (reference, same data) (ms)",
            mmm(r["proposed_setbased_sweep_s"], 1e3),
            "",
            "",
            "<= 200 ms",
            r["proposed_setbased_sweep_s"]["median"] <= 0.2,
        )

# 6 -----------------------------------------------------------------------------------
cs = load("fig6_coldstart")
if cs:
    ci, cf = cs["chronicle_import"], cs["chronicle_first_run"]
    mi, mf = cs.get("mlflow_import"), cs.get("mlflow_first_run")
    row(
        "6 `import chronicle_integrations` (ms)",
        f"{mmm(ci['import_s'], 1e3)}; loads {', '.join(ci['loaded']) or 'no framework'}",
        f"`import mlflow` {mmm(mi['import_s'], 1e3)}" if mi else "n/a",
        f"{mi['import_s']['median'] / ci['import_s']['median']:.1f}x faster" if mi else "",
        "<= 100 ms, no framework",
        ci["import_s"]["median"] <= 0.1
        and not set(ci["loaded"]) & {"torch", "lightning", "transformers", "pytorch_lightning"},
    )
    row(
        "6 first run started, embedded (ms)",
        f"{mmm(cf['total_s'], 1e3)} (client {cf['client_s']['median'] * 1e3:.0f}, create "
        f"{cf['create_s']['median'] * 1e3:.0f}, start {cf['start_s']['median'] * 1e3:.0f})",
        f"MLflow first start_run (sqlite) {mmm(mf['total_s'], 1e3)}" if mf else "n/a",
        f"{mf['total_s']['median'] / cf['total_s']['median']:.1f}x faster" if mf else "",
        "",
        None,
    )

# 7 -----------------------------------------------------------------------------------
ew = load("fig7_endwait")
for mode, sizes in (ew or {}).get("modes", {}).items():
    for size, s in sizes.items():
        row(
            f"7 end-of-run wait, {mode}, {size} (ms after upload done)",
            mmm(s["overhead_ms"]),
            f"upload itself {mmm(s['upload_s'], fmt='{:.2f}')} s",
            "",
            "<= 50 ms",
            s["overhead_ms"]["median"] <= 50,
        )

# machine and load --------------------------------------------------------------------
files = sorted(RESULTS.glob("*_quick.json" if QUICK else "*.json"))
files = [
    f for f in files if (QUICK or not f.name.endswith("_quick.json")) and "_profiled" not in f.name
]
if files:
    m = json.loads(files[0].read_text())["machine"]
    print(
        f"Machine: {m.get('cpu', '?')}, nproc {m['nproc']}, {m.get('mem_total_gib')} GiB RAM, "
        f"disk {m['disk'].get('device', '?')} ({m['disk'].get('fstype', '?')}, "
        f"{m['disk']['total_gib']} GiB, {m['disk']['free_gib']} GiB free), Python "
        f"{m['python']}, {m['platform']}.\n"
    )
    print("| result file | written | 1/5/15-min load at start | at end | versions |")
    print("|---|---|---|---|---|")
    for f in files:
        d = json.loads(f.read_text())
        la = d.get("load_at_start")
        le = d["machine"]["loadavg"]
        print(
            f"| {f.name} | {d['when']} | "
            + ("/".join(f"{x:.2f}" for x in la) if la else "n/a")
            + " | "
            + "/".join(f"{x:.2f}" for x in le)
            + " | "
            + ", ".join(f"{k} {v}" for k, v in d.get("versions", {}).items())
            + " |"
        )
    print()
print("| figure | ours: median [min-max] | baseline (same run) | ratio | goal | met |")
print("|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
