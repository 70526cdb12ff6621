"""The benchmark's results as a table (``measure | value | detail`` rows in reading order) and its printing."""

from __future__ import annotations

from typing import Any


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def duration(x: float | None) -> str:
    """Seconds as a human duration (s, min, h, d)."""
    if x is None:
        return "-"
    if x < 120:
        return _s(x)
    if x < 7200:
        return f"{x / 60:.1f} min"
    if x < 3 * 86400:
        return f"{x / 3600:.1f} h"
    return f"{x / 86400:.1f} d"


def _mib(x: float | None) -> str:
    return "-" if x is None else (f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB")
def table_rows(res: dict) -> list[tuple[str, str, str]]:
    """(measure, value, detail) rows of the results, in reading order."""
    rows: list[tuple[str, str, str]] = []
    g = res.get("gemm")
    if g:
        bf = g.get("bf16_gflops")
        rows.append(("GEMM peak fp32 / bf16", f"{g['fp32_gflops']:.0f} / {'-' if bf is None else f'{bf:.0f}'} GFLOP/s",
                     f"{g['size']}x{g['size']} matmul, fastest of runs"
                     + (f"; bf16 at {g['bf16_size']}x{g['bf16_size']}" if g.get("bf16_size") else "")))
    u = res.get("unet")
    if u and "s" in u:
        frac = u.get("fraction_of_fp32_peak")
        rows.append(("UNet step fp32 (batch 1)", _s(u["s"]),
                     f"latent {'x'.join(map(str, u['latent_shape']))}, {u['params'] / 1e6:.1f} M params, "
                     f"{u['gflop']:.1f} GFLOP -> {u['gflops']:.1f} GFLOP/s"
                     + (f" ({frac:.0%} of fp32 peak)" if frac else "")))
        labels = {"bf16_autocast": "UNet step bf16 autocast", "channels_last_3d": "UNet step channels-last-3d"}
        for key, entry in (u.get("variants") or {}).items():
            row = _variant_row(labels[key], entry)
            if entry.get("fraction_of_bf16_peak"):
                row = (row[0], row[1], row[2] + f"; {entry['gflops']:.1f} GFLOP/s "
                       f"({entry['fraction_of_bf16_peak']:.0%} of bf16 peak)")
            rows.append(row)
        if "compile" in u:
            c = u["compile"]
            row = _variant_row("UNet step torch.compile", c)
            if c.get("status") == "ok":
                row = (row[0], row[1], row[2].replace("vs fp32", f"vs fp32 eager {_s(c['eager_s'])} in its subprocess")
                       + f", compile {c['compile_s']:.0f} s")
            rows.append(row)
    sh = res.get("shared_step")
    if sh:
        rows.append(("Conditional step, shared encoder", _s(sh["shared"]["s"]),
                     f"eps + G_psi from one encoder pass, {sh['shared']['gflop']:.1f} GFLOP"))
        rows.append(("Conditional step, two full passes", _s(sh["separate"]["s"]),
                     f"{sh['ratio']:.2f}x the shared step (FLOP ratio {sh['flop_ratio']:.2f}); "
                     f"max |diff| {sh['max_abs_diff']:.1e}"))
    rec = res.get("reconstruction") or {}
    for key, label in (("ldae", "LDAE"), ("voxel_dae", "Voxel DAE")):
        r = rec.get(key)
        if r:
            parts = ", ".join(f"{k.replace('_', ' ')} {_s(v)}" for k, v in r["phases_s"].items())
            rows.append((f"{label} reconstruction, {r['steps']}+{r['steps']} steps", _s(r["s"]),
                         f"{parts}; {_s(r['per_step_s'])}/step; peak +{_mib(r['peak_mib'])}; {r['gflop']:.0f} GFLOP"))
    if "ratio" in rec:
        n = rec["ldae"]["extrapolated_steps"]
        rows.append(("Voxel DAE / LDAE, measured", f"{rec['ratio']:.1f}x", f"FLOP ratio {rec['flop_ratio']:.1f}x"))
        rows.append((f"Voxel DAE / LDAE, extrapolated to {n} steps", f"{rec['extrapolated_ratio']:.1f}x",
                     f"{_s(rec['voxel_dae']['extrapolated_s'])} vs {_s(rec['ldae']['extrapolated_s'])} per scan; "
                     f"FLOP ratio {rec['extrapolated_flop_ratio']:.1f}x; paper (A100): "
                     f"{rec['paper_claim']['voxel_dae_s']:g} s vs {rec['paper_claim']['ldae_s']:g} s "
                     f"= {rec['paper_claim']['ratio']:.0f}x"))
    d = res.get("autoencoder_decode")
    if d:
        shape = "x".join(map(str, d["image_shape"]))
        rows.append(("Autoencoder decode fp32", _s(d["fp32"]["s"]),
                     f"to {shape}, {d['gflop']:.0f} GFLOP, peak +{_mib(d['fp32']['peak_mib'])}"))
        b = d["bf16_autocast"]
        if b.get("status") == "ok":
            rows.append(("Autoencoder decode bf16 autocast", _s(b["s"]),
                         f"{b['speedup']:.2f}x, peak +{_mib(b['peak_mib'])}, max |diff| {b['max_abs_diff']:.2e} "
                         f"({b['rel_diff']:.2%} of std)"))
        else:
            rows.append(("Autoencoder decode bf16 autocast", b.get("status", "-"), b.get("reason", "")))
    if res.get("train"):
        rows.extend(train_rows(res["train"]))
    r = res.get("recommendation")
    if r:
        keys = [k for k in ("unet_autocast_bf16", "autoencoder_autocast_bf16", "channels_last_3d", "compile") if r.get(k)]
        rows.append(("Recommended for inference", ", ".join(keys) or "fp32 eager (nothing measured helps enough)",
                     "; ".join(f"{k}: {v}" for k, v in r["reasons"].items())))
    return rows


def train_rows(train: dict) -> list[tuple[str, str, str]]:
    """Rows of the ``train`` section: per stage the step time and memory per batch size, the largest batch
    that fits and why the sweep stopped; the preset's schedule per device count; the total."""
    rows: list[tuple[str, str, str]] = []
    for stage, st in train["stages"].items():
        sizes = "; ".join(
            f"{r['batch']}: {_s(r['s'])} +{_mib(r.get('peak_mib'))}" if r["status"] == "ok"
            else f"{r['batch']}: {r['status']}" for r in st["batches"])
        one = st["plans"].get("1")
        value = f"{_s(one['step_s'])} (batch {one['micro_batch']})" if one else "does not fit"
        rows.append((f"Train {stage} step, {st['precision']}", value,
                     f"batch: time +peak memory -- {sizes}; largest batch that fits {st['largest_batch'] or '-'} "
                     f"(stopped: {st['stop']['reason']}); {st['trainable_params'] / 1e6:.1f} M trainable params; "
                     + "; ".join(st["notes"])))
        for k, p in st["plans"].items():
            if p is None:
                rows.append((f"Train {stage} schedule, {k} device(s)", "-", "batch 1 does not fit"))
                continue
            rows.append((f"Train {stage} schedule, {k} device(s)", duration(p["schedule_s"]),
                         f"micro-batch {p['micro_batch']} x accumulation {p['accumulate']} x {k} = effective batch "
                         f"{p['effective_batch']} (preset {p['preset_effective_batch']}); "
                         f"{p['samples_per_s']:.2f} samples/s; epoch {duration(p['epoch_s'])} over "
                         f"{p['train_scans']} training scans; {p['max_epochs']} epochs"))
    for k, total in (train.get("schedule_s") or {}).items():
        rows.append((f"Training schedule, all stages, {k} device(s)", duration(total),
                     f"cohort of {train['scans']} scans; {train['assumption']}"))
    return rows


def _variant_row(label: str, entry: dict) -> tuple[str, str, str]:
    if entry.get("status") != "ok":
        return label, entry.get("status", "-"), entry.get("reason", "")
    return label, _s(entry["s"]), (f"{entry['speedup']:.2f}x vs fp32 (timed alternately), max |diff| {entry['max_abs_diff']:.2e} "
                                   f"({entry['rel_diff']:.2%} of std)")


def print_table(res: dict, console: Any = None) -> None:
    """Print the results as a rich table."""
    from rich.console import Console
    from rich.table import Table

    env = res["environment"]
    title = (f"ldae bench: preset {res['preset']} on {env.get('device_name', res['device'])} ({res['device']}, "
             f"{env['threads']} threads, load {env['load_average'][0]:.1f})")
    table = Table(title=title, show_lines=False)
    table.add_column("measure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("detail", overflow="fold")
    for row in table_rows(res):
        table.add_row(*row)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for the detail column
            console = Console(width=160)
    console.print(table)
    for note in res.get("notes", []):
        console.print(f"[dim]note: {note}[/dim]")


