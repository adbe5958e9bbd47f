"""Outputs of a sweep: a rich table in the terminal, results.csv, results.json, runtime.png and roofline.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = (
    "impl", "source", "mode", "dtype", "B", "NH", "S", "DHQK", "DHHV", "chunk", "x", "reps", "status", "note",
    "ms_median", "ms_min", "ms_max", "ms_iqr", "calls_per_run", "compile_s", "peak_mb", "peak_exact", "xla_mb",
    "flops", "bytes", "ai", "tflops", "tbs", "frac_peak", "frac_bw", "roofline_frac", "measured", "kernels",
)


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: Any) -> str:
    return "" if x is None else f" ({100 * x:.0f}%)"


NOT_MEASURED = ("not installed", "not run")


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any], console: Console) -> None:
    """One line per case (time median ± IQR, peak memory, achieved rates and their share of the device limits),
    then the implementations that were not measured and why."""
    peak = meta["device_peak"]
    limits = f"{peak['name']}: {peak['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {peak['hbm_bytes'] / 1e12:.2f} TB/s" \
        if peak else "device peak unknown: no fractions"
    table = Table(title=f"xlstm-jax bench: {meta['preset']}, {meta['dtype']}, {meta['device_kind']} ({limits})")
    for column in ("impl", "mode", "B×NH×S", "DHQK/DHHV", "L", "ms (± IQR)", "peak MB", "XLA MB", "TFLOP/s",
                   "TB/s", "roofline", "status"):
        table.add_column(column, justify="left" if column in ("impl", "status") else "right")
    measured = [r for r in rows if r["status"] not in NOT_MEASURED]
    for r in sorted(measured, key=lambda r: (r["source"] != "xlstm_jax", r["impl"], r["mode"], r["x"])):
        ok = r["status"] == "ok"
        status = {"ok": "[green]ok[/green]", "skipped": "[yellow]skipped[/yellow]"}.get(
            r["status"], f"[bold red]{r['status']}[/bold red]")
        if not ok and r.get("note"):
            status += f" {r['note']}"
        peak_mb = _num(r.get("peak_mb"), ".0f")
        if r.get("peak_mb") is not None and not r.get("peak_exact"):
            peak_mb = "≤" + peak_mb
        cells = ["-"] * 6
        if ok:
            roof = r.get("roofline_frac")
            cells = [f"{r['ms_median']:.3f} ± {r['ms_iqr']:.3f}", peak_mb, _num(r.get("xla_mb"), ".1f"),
                     _num(r["tflops"], ".3g") + _pct(r["frac_peak"]), _num(r["tbs"], ".3g") + _pct(r["frac_bw"]),
                     "-" if roof is None else f"{100 * roof:.1f}%"]
        table.add_row(r["impl"], r["mode"], f"{r['B']}×{r['NH']}×{r['S']}", f"{r['DHQK']}/{r['DHHV']}",
                      _num(r["chunk"], "d"), *cells, status)
    console.print(table)
    absent = [r for r in rows if r["status"] in NOT_MEASURED]
    if absent:
        others = Table(title="Not measured")
        for column in ("impl", "status", "why"):
            others.add_column(column)
        for r in absent:
            others.add_row(r["impl"], r["status"], r["note"])
        console.print(others)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows, columns in `COLUMNS` order (missing values empty)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})


def write_json(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """{"meta": run metadata, "rows": [...]}."""
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def _label(r: dict[str, Any]) -> str:
    """An implementation's name with its chunk size, named once (the impl of a multi-chunk run names it already)."""
    named = r["chunk"] is None or r["impl"].endswith(f" L={r['chunk']}")
    return r["impl"] if named else f"{r['impl']} L={r['chunk']}"


def _series(rows: list[dict[str, Any]], mode: str, key: str) -> dict[str, tuple[list, list, str]]:
    """impl -> (x values, y values, source) for the ok rows of one mode that have `key`."""
    out: dict[str, tuple[list, list, str]] = {}
    for r in sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["x"]):
        if r["mode"] == mode and r.get(key) is not None:
            xs, ys, _ = out.setdefault(_label(r), ([], [], r["source"]))
            xs.append(r["x"])
            ys.append(r[key])
    return out


def _panels(rows, modes, key, scale, ylabel, x_name, title, path, empty_note):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = _series(rows, mode, key)
        for label, (xs, ys, source) in sorted(series.items()):
            ax.plot(xs, [y * scale for y in ys], marker="o", linestyle="--" if source == "peer" else "-",
                    label=label)
        ax.set_title({"fw": "forward", "fwbw": "forward + backward"}[mode])
        ax.set_xlabel(x_name)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.set_xscale("log", base=2)
            if key == "ms_median":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> list[Path]:
    """runtime.png (ms vs the preset's x, one panel per mode, one line per implementation; peers dashed) and
    roofline.png (measured time's share of the roofline bound, %); returns the paths written."""
    modes = [m for m in ("fw", "fwbw") if any(r.get("mode") == m for r in rows)] or ["fw"]
    title = f"{meta['preset']} ({meta['dtype']}) on {meta['device_kind']}"
    runtime, roof = out / "runtime.png", out / "roofline.png"
    _panels(rows, modes, "ms_median", 1.0, "time per call [ms] (median)", meta["x_name"], title, runtime,
            "no successful case")
    note = "no successful case" if meta["device_peak"] else \
        f"device peak unknown ({meta['device_kind']}): no roofline fraction"
    _panels(rows, modes, "roofline_frac", 100.0, "share of the roofline bound [%]", meta["x_name"], title, roof,
            note)
    return [runtime, roof]


def _cell(by_mode: dict[str, dict[str, Any]], modes: list[str], fmt) -> str:
    return " / ".join(fmt(by_mode[m]) if m in by_mode else "-" for m in modes)


def markdown_tables(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Two markdown tables of the ok rows, one line per implementation (chunk size in its name) and one column per
    x value: medians in ms (fw / fw+bw) and the share of the roofline bound; then the implementations that have no
    ok row, with why, and the ones measured with other kernels than the run's last call (a resumed sweep)."""
    modes = [m for m in ("fw", "fwbw") if any(r.get("mode") == m for r in rows)]
    grid: dict[str, dict[Any, dict[str, dict[str, Any]]]] = {}
    sources = {}
    for r in rows:
        if r["status"] == "ok":
            label = _label(r)
            grid.setdefault(label, {}).setdefault(r["x"], {})[r["mode"]] = r
            sources[label] = r["source"]
    xs = sorted({x for cells in grid.values() for x in cells})
    labels = sorted(grid, key=lambda n: (sources[n] != "xlstm_jax", n))
    head = "| implementation | " + " | ".join(f"{meta['x_name']}={x}" for x in xs) + " |\n"
    rule = "| --- " * (len(xs) + 1) + "|\n"
    out = []
    for what, fmt in (("median ms", lambda r: f"{r['ms_median']:.2f}"),
                      ("share of the roofline bound", lambda r: _num(r.get("roofline_frac"), ".0%"))):
        body = "".join(f"| {label} | " + " | ".join(_cell(grid[label].get(x, {}), modes, fmt) for x in xs) + " |\n"
                       for label in labels)
        out.append(f"{what}, {' / '.join(modes)}:\n\n{head}{rule}{body}")
    missing = {}
    for r in rows:
        name = r["impl"].split(" L=")[0]
        if r["status"] != "ok" and not any(label.split(" L=")[0] == name for label in grid):
            missing.setdefault(name, f"{r['status']}: {r.get('note') or ''}".strip())
    if missing:
        out.append("not measured: " + "; ".join(f"`{n}` {why}" for n, why in missing.items()) + "\n")
    newest = meta.get("kernels")
    stale = sorted({_label(r) for r in rows if r["status"] == "ok" and r.get("kernels") not in (None, newest)})
    if stale:
        out.append("measured with other kernel code or launch parameters than the run's last call (kernels "
                   f"{newest}): " + ", ".join(stale) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m xlstm_jax.bench.report DIR ...`: redraw the plots of each results folder and print its
    markdown tables (for docs/benchmarks.md)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders holding a results.json")
    args = parser.parse_args(argv)
    for folder in args.dirs:
        data = json.loads((folder / "results.json").read_text())
        write_plots(data["rows"], data["meta"], folder)
        print(f"#### {data['meta']['preset']} ({folder})\n\n{markdown_tables(data['rows'], data['meta'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
