"""Which inference settings are worth making the default on this device, each with its measured reason."""

from __future__ import annotations

from typing import Any


def recommend(results: dict, rules: dict) -> dict:
    """An option is recommended when it is at least ``rules['min_speedup']`` × faster than fp32 eager and, for
    reduced precision, its max |difference| is at most ``rules['max_rel_diff']`` × the fp32 output's std."""
    min_speedup, max_rel = float(rules["min_speedup"]), float(rules["max_rel_diff"])
    out: dict[str, Any] = {"device": results.get("device"), "min_speedup": min_speedup, "max_rel_diff": max_rel}
    reasons: dict[str, str] = {}

    def judge(key: str, entry: dict | None, precision: bool) -> None:
        if not entry or entry.get("status") != "ok":
            out[key] = False
            reasons[key] = "not measured" + (f" ({entry.get('reason')})" if entry and entry.get("reason") else "")
            return
        fast = entry["speedup"] >= min_speedup
        accurate = (not precision) or entry["rel_diff"] <= max_rel
        out[key] = bool(fast and accurate)
        reasons[key] = (f"{entry['speedup']:.2f}x vs fp32 eager (need >= {min_speedup:g}x)"
                        + (f", max |diff| = {entry['rel_diff']:.2%} of the output std (limit {max_rel:.0%})"
                           if precision else ""))

    variants = results.get("unet", {}).get("variants") or {}
    judge("unet_autocast_bf16", variants.get("bf16_autocast"), True)
    judge("channels_last_3d", variants.get("channels_last_3d"), False)
    judge("compile", results.get("unet", {}).get("compile"), False)
    judge("autoencoder_autocast_bf16", (results.get("autoencoder_decode") or {}).get("bf16_autocast"), True)
    out["reasons"] = reasons
    return out
