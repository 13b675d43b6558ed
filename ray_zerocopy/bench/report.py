"""Output of the benchmark: per-approach summary numbers, the text table, the JSON file, the PNG chart."""

from __future__ import annotations

import json
import statistics
from typing import Any, Sequence

MB = 1e6


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(result: dict[str, Any], model_bytes: int, device: str) -> None:
    """Add medians, spreads and the node-memory multiple to one approach's raw result (in place)."""
    for phase in ("cold", "warm"):
        times = result.get(f"{phase}_s") or []
        if times:
            result[f"{phase}_median_s"] = statistics.median(times)
            result[f"{phase}_min_s"], result[f"{phase}_max_s"] = min(times), max(times)
            result[f"{phase}_p10_s"], result[f"{phase}_p90_s"] = _quantile(times, 0.1), _quantile(times, 0.9)
    pss = result.get("actor_pss_added_bytes")
    if pss:
        result["node_bytes"] = result.get("store_bytes", 0) + result.get("mapped_file_bytes", 0) + sum(pss)
        result["node_x_model"] = result["node_bytes"] / model_bytes
        result["actor_uss_median_bytes"] = statistics.median(result["actor_uss_added_bytes"])
    if device != "cpu" and result.get("warm_median_s"):
        result["h2d_gbps"] = model_bytes / result["warm_median_s"] / 1e9
        result["h2d_cold_gbps"] = model_bytes / result["cold_median_s"] / 1e9
    if "device_added_bytes" in result:
        result["device_x_model"] = result["device_added_bytes"] / model_bytes
    if result.get("cold_together_s"):  # every actor of the round loaded at once: what they moved together
        result["together_cold_gbps"] = result["cold_together_actors"] * model_bytes / result["cold_together_s"] / 1e9
    if result.get("warm_together_s"):
        result["together_warm_gbps"] = result["warm_together_loads"] * model_bytes / result["warm_together_s"] / 1e9


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def table_head(device: str, together: bool) -> list[str]:
    """The table's column names."""
    head = ["approach", "prepare s", "cold ms [min-max]", "warm ms [p10-p90]",
            "node mem x" if device == "cpu" else "dev mem x", "USS/actor MB", "drv peak MB", "max|diff|"]
    if device != "cpu":
        head.append("H2D GB/s cold/warm")
    if together:
        head += ["all GB/s cold/warm", "last ready ms"]
    return [*head, "status"]


def table_row(r: dict[str, Any], device: str, together: bool) -> list[str]:
    """One approach's cells in the table (also printed as a progress line once it has run)."""
    if not r.get("ok") and r.get("warm_median_s") is None:
        err = (r.get("error") or "failed").replace("\n", " ")
        return [r["name"], *["-"] * (7 + (device != "cpu") + 2 * together), "FAILED: " + err[:110]]
    cells = [
        r["name"],
        f"{r['prepare_s']:.2f}" if r.get("prepare_s") is not None else "-",
        f"{_ms(r.get('cold_median_s'))} [{_ms(r.get('cold_min_s'))}-{_ms(r.get('cold_max_s'))}]",
        f"{_ms(r.get('warm_median_s'))} [{_ms(r.get('warm_p10_s'))}-{_ms(r.get('warm_p90_s'))}]",
        _memory_cell(r, device),
        f"{r['actor_uss_median_bytes'] / MB:.1f}" if "actor_uss_median_bytes" in r else "-",
        f"{r['driver_peak_private_bytes'] / MB:.0f}" if "driver_peak_private_bytes" in r else "-",
        f"{r['max_abs_diff']:.3g}" if r.get("max_abs_diff") is not None else "-",
    ]
    if device != "cpu":
        cells.append(f"{r['h2d_cold_gbps']:.1f}/{r['h2d_gbps']:.1f}" if "h2d_gbps" in r else "-")
    if together:
        cells += [f"{r['together_cold_gbps']:.1f}/{r.get('together_warm_gbps', 0):.1f}" if "together_cold_gbps" in r
                  else "-", _ms(r.get("cold_together_s"))]
    cells.append("ok" if r.get("ok") else "FAILED: " + (r.get("error") or "")[:110])
    return cells


def _memory_cell(r: dict[str, Any], device: str) -> str:
    key = "node_x_model" if device == "cpu" else "device_x_model"
    return f"{r[key]:.2f}" if key in r else "-"


def format_table(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The human-readable table (what the benchmark prints at the end)."""
    device = meta["device"]
    together = bool(meta.get("together"))
    head = table_head(device, together)
    rows = [head, *(table_row(r, device, together) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    la = meta["load_avg_before"]
    title = (
        f"ray_zerocopy bench: {meta['model']} ({meta['dtype']}, {meta['model_bytes'] / MB:.1f} MB unique, "
        f"{meta['tensors']} tensors), {meta['actors']} actors, device {device}, {meta['repeats']} warm loads/actor "
        f"({meta['fast_repeats']} under {meta['fast_s'] * 1e3:.0f} ms), "
        f"{meta['cpus']} cores, load avg before {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    )
    notes = [
        f"cold: first load in each of {meta['actors'] * meta['cold_rounds']} fresh actor processes "
        f"({'all of a round at once' if meta.get('together') else 'one at a time'}); "
        f"warm: later loads in {meta['actors']} of them.",
        "  Each load gets what a user of that approach holds: ours the ModelRef (small; Ray Data's",
        "  fn_constructor_kwargs deliver it as is), ray_put/ray_native/classic an ObjectRef, disk loaders a path.",
        "node mem x: (object-store bytes + bytes of files the actors map their weights from, each once + sum of",
        "  the actors' added PSS outside those) / model unique bytes, every actor holding the model after one forward.",
        "  Files just written sit in the page cache (best case for disk loaders; torch_load's cache is not counted).",
        "USS/actor: private bytes an actor added; drv peak: driver's private peak during prepare;",
        "max|diff|: output vs the original weights, both computed in the same actor.",
        f"prepare s: the store's pages were faulted in before the first approach ({meta.get('store_touch_s') or 0:.2f} s"
        " for one model's bytes), which a fresh store's first put pays once.",
    ]
    if together:
        notes += ["together: every actor's load started at once; all GB/s: model bytes x actors / time from the",
                  "  start until the last was ready (last ready ms), first loads (cold) and later ones (warm: in rounds,",
                  "  every actor drops its model, then all reload at once; the rounds' times summed)."]
    if device != "cpu":
        notes += ["dev mem x: device memory the actors' models added on their GPUs (all processes: a share_gpu",
                  "  holder and its CUDA context included), after the loads and empty_cache(), before any forward",
                  "  (its kernels and cuBLAS workspace belong to the CUDA context) / model bytes; USS/actor is host",
                  "  memory, CUDA contexts excluded.",
                  "H2D GB/s: model bytes / median load time (call to ready model, synchronized); each actor",
                  "  creates its CUDA context before its cold load. Pinned-memory peak host-to-device in this run: "
                  f"{meta.get('pinned_peak_gbps') or 0:.2f} GB/s"]
    return "\n".join([title, "", *lines, "", *notes])


def write_json(path: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2, default=str)


def draw_png(path: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """Two bar charts side by side: load time (log scale, warm bars with cold markers) and node memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    ys = list(range(len(names)))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 2.2), sharey=True)
    colors = ["tab:green" if r["kind"] == "ours" else "tab:gray" for r in results]
    warm = [(r.get("warm_median_s") or 0) * 1e3 for r in results]
    ax_t.barh(ys, warm, color=colors, label="warm median")
    cold = [(r.get("cold_median_s") or float("nan")) * 1e3 for r in results]
    ax_t.plot(cold, ys, "k|", markersize=14, label="cold median")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("load time in an actor (ms, log scale)")
    ax_t.legend(loc="lower right", fontsize=8)
    node = [r.get("node_x_model") or 0 for r in results]
    ax_m.barh(ys, node, color=colors)
    ax_m.axvline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax_m.set_xlabel(f"node memory with {meta['actors']} actors (x model size)")
    for y, r in zip(ys, results):
        if not r.get("ok"):
            ax_t.text(0.02, y, "FAILED", transform=ax_t.get_yaxis_transform(), va="center", color="tab:red")
    ax_t.set_yticks(ys, names)
    ax_t.invert_yaxis()
    fig.suptitle(f"{meta['model']} {meta['dtype']} ({meta['model_bytes'] / MB:.0f} MB), {meta['actors']} actors, "
                 f"{meta['device']}, {meta['cpus']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
