"""Fits, tables and plots of bench/scaling.py's curves (kept apart from the measuring)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MODELS = ("lamemo", "xl", "none")
LINEAR_UP_TO = 1.2  # a fitted exponent at most this is called linear (noise of a busy machine)
# curve -> (x name, cost key, cost label); eval's cost is seconds per token (1 / tokens/s)
TIMED = {"train_mem": ("M", "step_s", "step s"), "train_seg": ("N", "step_s", "step s"),
         "eval_mem": ("eval M", "s_per_token", "s/token")}


def loglog(xs, ys) -> float | None:
    """Exponent k of y ~ x^k (least squares in log-log); None with fewer than 2 usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    a = np.array(pts)
    return float(np.polyfit(a[:, 0], a[:, 1], 1)[0])


def cost(row: dict, key: str) -> float:
    return 1.0 / row["tokens_per_s"] if key == "s_per_token" else row[key]


def exponents(xs, ys) -> dict:
    """Over all points, over the upper half of x, and over the last doubling alone."""
    half = len(xs) // 2
    return {"all": loglog(xs, ys), "upper_half": loglog(xs[half:], ys[half:]),
            "last_step": loglog(xs[-2:], ys[-2:])}


def extra_fit(xs, lam, xl) -> dict:
    """lamemo's cost above xl's: exponents, and a + bM + cM^2 with the M^2 term's share of the
    extra at the largest M (0: linear; near 1: quadratic)."""
    extra = [a - b for a, b in zip(lam, xl)]
    out = {"extra": extra, **exponents(xs, extra)}
    if len(xs) >= 3:
        c2, c1, c0 = np.polyfit(np.array(xs, float), np.array(extra, float), 2)
        top = c0 + c1 * xs[-1] + c2 * xs[-1] ** 2
        out["quadratic_share_at_max"] = float(c2 * xs[-1] ** 2 / top) if top > 0 else None
    up = out["upper_half"]
    out["linear"] = up is not None and up <= LINEAR_UP_TO
    return out


def fits(res: dict) -> dict:
    f: dict = {}
    for curve, (_, key, _) in TIMED.items():
        if curve not in res:
            continue
        c = res[curve]
        xs = [r["x"] for r in c["lamemo"]]
        f[curve] = {m: {"time": exponents(xs, [cost(r, key) for r in c[m]]),
                        "peak_mib": exponents(xs, [r["peak_mib"] for r in c[m]])}
                    for m in MODELS}
        if curve != "train_seg":
            f[curve]["lamemo_minus_xl"] = {
                "time": extra_fit(xs, [cost(r, key) for r in c["lamemo"]],
                                  [cost(r, key) for r in c["xl"]]),
                "peak_mib": extra_fit(xs, [r["peak_mib"] for r in c["lamemo"]],
                                      [r["peak_mib"] for r in c["xl"]])}
    if "ckpt" in res:
        f["ckpt"] = {s: {k: loglog([r["x"] for r in rows], [r[k] for r in rows])
                         for k in ("save_s", "load_s", "bytes")}
                     for s, rows in res["ckpt"].items()}
    if "prepare" in res:
        f["prepare"] = {t: {"seconds": loglog([r["x"] for r in rows], [r["seconds"] for r in rows])}
                        for t, rows in res["prepare"].items() if t != "one_core"}
    if "loader" in res:
        f["loader"] = {"tokens_per_s": loglog([r["x"] for r in res["loader"]],
                                              [r["loader_tokens_per_s"] for r in res["loader"]])}
    return f


def _k(v) -> str:
    return "  -  " if v is None else f"{v:5.2f}"


def _curve_table(res: dict, curve: str, fit: dict) -> list[str]:
    xname, key, label = TIMED[curve]
    c = res[curve]
    xs = [r["x"] for r in c["lamemo"]]
    lines = [f"{curve}: {label} and peak MiB against {xname}",
             f"{xname:>7} " + " ".join(f"{m + ' ' + label:>16} {m + ' MiB':>11}" for m in MODELS)]
    for i, x in enumerate(xs):
        lines.append(f"{x:>7} " + " ".join(f"{cost(c[m][i], key):16.4g} "
                                          f"{c[m][i]['peak_mib']:11.0f}" for m in MODELS))
    for m in MODELS:
        t, p = fit[m]["time"], fit[m]["peak_mib"]
        lines.append(f"  {m:7} exponent of {label}: all {_k(t['all'])}, upper half "
                     f"{_k(t['upper_half'])}; of peak MiB: all {_k(p['all'])}, upper half "
                     f"{_k(p['upper_half'])}")
    if "lamemo_minus_xl" in fit:
        e = fit["lamemo_minus_xl"]["time"]
        q = e.get("quadratic_share_at_max")
        lines.append(f"  lamemo - xl ({label}): " + ", ".join(f"{v:.4g}" for v in e["extra"])
                     + f"; exponent all {_k(e['all'])}, upper half {_k(e['upper_half'])}, "
                     f"last doubling {_k(e['last_step'])}; M^2 share at {xname}={xs[-1]}: "
                     + ("-" if q is None else f"{q:.0%}"))
        p = fit["lamemo_minus_xl"]["peak_mib"]
        lines.append(f"  lamemo - xl (peak MiB): exponent all {_k(p['all'])}, upper half "
                     f"{_k(p['upper_half'])}, last doubling {_k(p['last_step'])}")
    return lines + [""]


def verdict(fit: dict, curve: str, xs: list[int]) -> str:
    e = fit[curve]["lamemo_minus_xl"]["time"]
    what = "training step time" if curve == "train_mem" else "evaluation time per token"
    if e["linear"]:
        return (f"{what}: lamemo's cost above xl's stays linear in M up to {xs[-1]} "
                f"(upper-half exponent {e['upper_half']:.2f}).")
    q = e.get("quadratic_share_at_max")
    return (f"{what}: lamemo's cost above xl's is NOT linear in M: upper-half exponent "
            f"{_k(e['upper_half']).strip()}, last doubling {_k(e['last_step']).strip()}"
            + ("" if q is None else f"; the M^2 term is {q:.0%} of the extra at M={xs[-1]}")
            + ".")


def text(res: dict) -> str:
    f, lines = res["fits"], []
    for curve in TIMED:
        if curve in res:
            lines += _curve_table(res, curve, f[curve])
    for curve in ("train_mem", "eval_mem"):
        if curve in res:
            lines.append(verdict(f, curve, [r["x"] for r in res[curve]["lamemo"]]))
    if "ckpt" in res:
        lines += ["", "checkpoint (DeepSpeed, CPU/gloo, 1 process): save s / load s / MB by "
                  "parameters"]
        for s, rows in res["ckpt"].items():
            pts = "  ".join(f"{r['x'] / 1e6:.1f}M: {r['save_s']:.2f}/{r['load_s']:.2f}/"
                            f"{r['bytes'] / 1e6:.0f}" for r in rows)
            k = f["ckpt"][s]
            lines.append(f"  {s}: {pts}  (exponent save {_k(k['save_s'])}, load "
                         f"{_k(k['load_s'])})")
    if "prepare" in res:
        lines += ["", "lamemo prepare MB/s of text by corpus MB (every core)"]
        for t, rows in res["prepare"].items():
            if t == "one_core":
                pts = "  ".join(f"{r['tokenizer']}: {r['mb_per_s']:.1f}" for r in rows)
                lines.append(f"  1 worker at {rows[0]['x']} MB: {pts}")
                continue
            pts = "  ".join(f"{r['x']}: {r['mb_per_s']:.1f}" for r in rows)
            lines.append(f"  {t:5} {pts}  (exponent of seconds {_k(f['prepare'][t]['seconds'])})")
        for t, mb in res["sizes"].get("prepare_cap_mb", {}).items():
            rows, k = res["prepare"].get(t), f["prepare"].get(t, {}).get("seconds")
            if rows and k is not None:
                big = max(res["sizes"]["prepare_mb"])
                est = rows[-1]["seconds"] * (big / rows[-1]["x"]) ** k
                lines.append(f"  {t} stops at {mb} MB (time budget): {big} MB would take about "
                             f"{est / 60:.0f} min at the fitted exponent")
    if "loader" in res:
        pts = "  ".join(f"{r['x']}: {r['loader_tokens_per_s'] / 1e6:.0f}M" for r in res["loader"])
        lines += ["", f"loader target tokens/s by streams: {pts} (exponent "
                  f"{_k(f['loader']['tokens_per_s'])})"]
    if "state" in res:
        lines += ["", "memory state, fp32, d=512 M=512: MiB for 64 streams by layers"]
        for m in MODELS:
            pts = "  ".join(f"L{r['layers']}: {r['mib_64_streams']:.0f}" for r in res["state"]
                            if r["memory"] == m)
            lines.append(f"  {m:7} {pts}  (linear in streams and layers)")
    lines += ["", f"peak memory: {res['peak_memory']}"]
    return "\n".join(lines)


def plots(res: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    curves = [c for c in TIMED if c in res]
    if curves:
        fig, axes = plt.subplots(2, len(curves), figsize=(4.2 * len(curves), 7), squeeze=False)
        for j, curve in enumerate(curves):
            xname, key, label = TIMED[curve]
            for m in MODELS:
                rows = res[curve][m]
                xs = [r["x"] for r in rows]
                axes[0][j].loglog(xs, [cost(r, key) for r in rows], "o-", label=m, base=2)
                axes[1][j].loglog(xs, [max(r["peak_mib"], 1e-3) for r in rows], "o-", label=m,
                                  base=2)
            axes[0][j].set(title=curve, ylabel=label)
            axes[1][j].set(xlabel=xname, ylabel="peak MiB (RSS growth)")
            axes[0][j].legend()
        fig.tight_layout()
        fig.savefig(folder / "scaling_models.png", dpi=90)
        made.append("scaling_models.png")
    others = [c for c in ("ckpt", "prepare", "loader") if c in res]
    if others:
        fig, axes = plt.subplots(1, len(others), figsize=(4.2 * len(others), 3.5), squeeze=False)
        for ax, c in zip(axes[0], others):
            if c == "ckpt":
                for s, rows in res[c].items():
                    ax.loglog([r["x"] for r in rows], [r["save_s"] for r in rows], "o-",
                              label=f"{s} save")
                    ax.loglog([r["x"] for r in rows], [r["load_s"] for r in rows], "x--",
                              label=f"{s} load")
                ax.set(xlabel="parameters", ylabel="seconds", title="checkpoint")
                ax.legend(fontsize=6)
            elif c == "prepare":
                for t, rows in res[c].items():
                    if t != "one_core":
                        ax.semilogx([r["x"] for r in rows], [r["mb_per_s"] for r in rows], "o-",
                                    label=t)
                ax.set(xlabel="corpus MB", ylabel="MB/s", title="lamemo prepare")
                ax.legend(fontsize=7)
            else:
                ax.loglog([r["x"] for r in res[c]], [r["loader_tokens_per_s"] for r in res[c]],
                          "o-")
                ax.set(xlabel="streams", ylabel="target tokens/s", title="loader")
        fig.tight_layout()
        fig.savefig(folder / "scaling_costs.png", dpi=90)
        made.append("scaling_costs.png")
    plt.close("all")
    return made
