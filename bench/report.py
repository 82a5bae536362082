"""The bench report: one JSON record and its Markdown rendering."""

from __future__ import annotations

from typing import Any, Optional


def _f(x: Any, digits: int = 1, scale: float = 1.0, pct: bool = False) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, (int, float)):
        v = x * scale
        return f"{v * 100:.{digits}f}%" if pct else f"{v:,.{digits}f}"
    return str(x)


def _row_ok(r: dict) -> bool:
    return r.get("status") == "ok" and r.get("images_per_s")


def _first_ok(rows: list, driver: str) -> Optional[dict]:
    return next((r for r in rows if r.get("driver") == driver and _row_ok(r)), None)


def _status_line(section: dict) -> str:
    """What a section that did not finish says about itself."""
    return f"{section.get('status')}: {section.get('error', section.get('note', ''))}"


def profile_lines(prof: dict) -> list[str]:
    """The `profile` section: ms per step by kind of kernel, then the most expensive kernels."""
    lines = ["## Where the step's time goes (torch.profiler, minimal loop)", ""]
    if prof.get("status") != "ok":
        return lines + [_status_line(prof), ""]
    kinds = list(prof["ms_per_step"])
    cells = [f"{_f(prof['ms_per_step'][k], 1)} ({_f(prof['share'][k], 0, pct=True)})" for k in kinds]
    lines += [f"{prof['timeline']}, ms per step over {prof['steps']} steps.", "",
              "| " + " | ".join(kinds) + " |", "|" + "---:|" * len(kinds), "| " + " | ".join(cells) + " |", "",
              "| top kernels / ops | ms per step | calls per step |", "|---|---:|---:|"]
    lines += [f"| `{t['name'][:90]}` | {_f(t['ms_per_step'], 2)} | {_f(t['calls_per_step'], 0)} |"
              for t in prof.get("top", [])]
    return lines + [""]


def ratios(report: dict) -> dict:
    """ours (Lightning row, else the loop row) / open_clip eager and / open_clip compiled."""
    step = report.get("sections", {}).get("step", {})
    peer = report.get("sections", {}).get("openclip", {})
    rows = step.get("rows", [])
    ours = _first_ok(rows, "lightning") or _first_ok(rows, "loop")
    out: dict[str, Any] = {}
    if ours is None:
        return out
    out["ours"] = ours["name"]
    for variant in ("eager", "compiled"):
        ref = _first_ok(peer.get("rows", []), variant)
        if ref is not None:
            out[f"ours_over_openclip_{variant}"] = ours["images_per_s"] / ref["images_per_s"]
    return out


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    cfg = report.get("config", {})
    sections = report.get("sections", {})
    lines = [f"# pe-lightning bench: {env.get('device_name', '?')} ({env.get('device_kind', '?')}), "
             f"{env.get('date', '?')}", ""]
    versions = [f"torch {env.get('torch')}", f"lightning {env.get('lightning')}", f"timm {env.get('timm')}",
                f"open_clip {env.get('open_clip')}", f"python {env.get('python')}"]
    if env.get("cuda"):
        versions.append(f"CUDA {env['cuda']}, cuDNN {env.get('cudnn')}")
    if env.get("git_commit"):
        versions.append(f"commit {env['git_commit']}")
    lines.append(" · ".join(versions))
    lines.append("")
    peak = report.get("peak_matmul_flops")
    lines.append(f"Batch {cfg.get('batch')}, {cfg.get('resolution')} px, precision `{cfg.get('precision')}`, "
                 f"compile {'on' if cfg.get('compile') else 'off'}, {cfg.get('warmup')} warmup + "
                 f"{cfg.get('steps')} timed steps. Measured dense matmul peak: "
                 f"{_f(peak, 1, 1e-12)} TFLOP/s ({report.get('peak_matmul_desc', '')}).")
    lines.append("")

    step = sections.get("step")
    peer = sections.get("openclip")
    if step or peer:
        lines += ["## Training step", "",
                  "| step | images/s | step ms | 1st step s | warmup s | peak mem GiB | MFU | syncs/step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for sec in (step, peer):
            if not sec:
                continue
            for r in sec.get("rows", []):
                if r.get("status") != "ok":
                    lines.append(f"| {r.get('name')} | failed: {str(r.get('error', ''))[:60]} | | | | | | |")
                    continue
                lines.append(f"| {r['name']} | {_f(r.get('images_per_s'))} | {_f(r.get('step_ms'))} | "
                             f"{_f(r.get('first_step_s'))} | {_f(r.get('warmup_s'))} | "
                             f"{_f(r.get('peak_mem_gib'), 2)} | {_f(r.get('mfu'), 1, pct=True)} | "
                             f"{_f(r.get('host_syncs_per_step'), 1)} |")
            if sec.get("status") not in ("ok", None):
                lines.append(f"| ({'step' if sec is step else 'openclip'} section {sec.get('status')}: "
                             f"{str(sec.get('error', sec.get('note', '')))[:80]}) | | | | | | | |")
        lines.append("")
        lines.append("images/s and step ms: steady state over the timed steps (CUDA events on GPU). 1st step: "
                     "the first step alone (compilation). Peak mem: torch.cuda.max_memory_allocated on GPU, the "
                     "process's peak RSS on CPU. MFU: model FLOPs (forward + backward of both towers, "
                     "torch.utils.flop_counter) x images/s / the measured matmul peak. syncs/step: host syncs "
                     "caught by CUDA's sync debug mode after the timed window (GPU only), on the median step of "
                     "one log interval for the Lightning rows (the log step's own syncs are listed below).")
        lines.append("")
        r = ratios(report)
        if r:
            parts = [f"ours / open_clip {v}: **{r[f'ours_over_openclip_{v}']:.2f}x**" for v in ("eager", "compiled")
                     if f"ours_over_openclip_{v}" in r]
            if parts:
                lines += [f"Ratios ({r['ours']}): " + "; ".join(parts) + ".", ""]
        if step and step.get("status") == "ok":
            lines.append(f"Ours: `{step.get('preset')}` ({_f(step.get('params_m'), 1)} M params), "
                         f"{_f(step.get('flops_per_sample'), 1, 1e-9)} GFLOP/sample fwd+bwd (vision "
                         f"{_f(step.get('flops_per_sample_vision'), 1, 1e-9)} + text "
                         f"{_f(step.get('flops_per_sample_text'), 1, 1e-9)}; mask regularization adds "
                         f"{_f(step.get('flops_per_sample_incl_mask_reg', 0) - step.get('flops_per_sample', 0), 1, 1e-9)}"
                         f", not counted in MFU); {step.get('optimizer')} ({step.get('lamb_path')}), grad clip "
                         f"{step.get('grad_clip')}. Graphs compiled: "
                         f"{step.get('compile_counters', {}).get('unique_graphs', '-')}, graph breaks: "
                         f"{step.get('compile_counters', {}).get('graph_breaks', '-')}.")
            sites = sorted({s for row in step.get("rows", []) for s in row.get("host_sync_sites", [])})
            if sites:
                lines.append("Host syncs seen (sync debug mode, after the timed window): "
                             + "; ".join(f"`{s}`" for s in sites[:6]) + ".")
            for row in step.get("rows", []):
                if row.get("host_syncs_by_step"):
                    lines.append(f"Syncs per step over one log interval ({row['name']}): "
                                 f"{row['host_syncs_by_step']}.")
        if peer and peer.get("status") == "ok":
            lines.append(f"open_clip: {peer.get('model')} ({_f(peer.get('params_m'), 1)} M params), "
                         f"{_f(peer.get('flops_per_sample'), 1, 1e-9)} GFLOP/sample, {peer.get('optimizer')}."
                         + (f" {peer['note']}." if peer.get("note") else ""))
        lines.append("")

    var = sections.get("variants")
    if var:
        lines += ["## Variants of our step (minimal loop; compare with `ours: minimal loop`)", "",
                  "| variant | images/s | step ms | 1st step s | peak mem GiB | MFU |", "|---|---:|---:|---:|---:|---:|"]
        base = _first_ok((step or {}).get("rows", []), "loop")
        for r in var.get("rows", []):
            if r.get("status") != "ok":
                lines.append(f"| {r.get('name')} | failed: {str(r.get('error', ''))[:60]} | | | | |")
                continue
            rel = f" ({r['images_per_s'] / base['images_per_s']:.2f}x)" if base else ""
            lines.append(f"| {r['name']} | {_f(r['images_per_s'])}{rel} | {_f(r.get('step_ms'))} | "
                         f"{_f(r.get('first_step_s'))} | {_f(r.get('peak_mem_gib'), 2)} | "
                         f"{_f(r.get('mfu'), 1, pct=True)} |")
        if var.get("status") not in ("ok", None):
            lines.append(f"| (section {var.get('status')}: {str(var.get('error', ''))[:80]}) | | | | | |")
        lines.append("")
        opt = var.get("optimizer")
        if opt and opt.get("status") == "ok":
            lines += [f"Optimizer part alone ({_f(opt.get('params_m'), 1)} M params in {opt.get('tensors')} tensors, "
                      f"ms per step; first call, compile included, in s): LAMB with clipping inside: "
                      f"{opt.get('timm_lamb')} {_f(opt.get('timm_lamb_ms'), 2)}, our FusedLamb compiled "
                      f"{_f(opt.get('fused_lamb_ms'), 2)} (first {_f(opt.get('fused_lamb_first_s'), 1)} s); for scale "
                      f"{opt.get('adamw')} {_f(opt.get('adamw_ms'), 2)} + the Trainer's clip_grad_norm_ "
                      f"{_f(opt.get('clip_grad_norm_ms'), 2)}.", ""]
        elif opt:
            lines += [f"Optimizer part alone: failed: {opt.get('error')}", ""]

    if sections.get("profile"):
        lines += profile_lines(sections["profile"])

    if sections.get("video"):
        from bench.video_step import video_lines

        lines += video_lines(sections["video"])

    if sections.get("distill"):
        from bench.distill_step import distill_lines

        lines += distill_lines(sections["distill"])

    if sections.get("lang"):
        from bench.lang_step import lang_lines

        lines += lang_lines(sections["lang"])

    data = sections.get("data")
    if data:
        lines += ["## Data pipeline (decode + augment + tokenize, no model)", ""]
        if data.get("status") != "ok":
            lines.append(_status_line(data))
        else:
            lines += [f"Shapes-world shards ({data.get('shapes_train')} PNG images, 64 px) -> batches of "
                      f"{data.get('batch')} at {data.get('resolution')} px.", "",
                      "| workers | images/s | first batch s |", "|---:|---:|---:|"]
            for r in data.get("rows", []):
                if r.get("status") != "ok":
                    lines.append(f"| {r.get('workers')} | failed: {str(r.get('error', ''))[:60]} | |")
                else:
                    lines.append(f"| {r['workers']} | {_f(r['images_per_s'])} | {_f(r['first_batch_s'], 2)} |")
        lines.append("")

    emb = sections.get("embedded")
    if emb:
        lines += ["## CPU embedded default (`make stage=pretrain`)", ""]
        if emb.get("status") != "ok":
            lines.append(_status_line(emb))
        else:
            h = emb.get("headline", {})
            lines += ["| source | wall s | train s | zero-shot top-1 | held-out top-1 | samples seen |",
                      "|---|---:|---:|---:|---:|---:|",
                      f"| {emb.get('metrics_file')} | {_f(emb.get('wall_s'), 0)} | {_f(h.get('train_seconds'), 0)} | "
                      f"{_f(h.get('zeroshot_top1'), 1, pct=True)} | {_f(h.get('zeroshot_heldout_top1'), 1, pct=True)} | "
                      f"{_f(h.get('samples_seen'), 0)} |"]
            if emb.get("note"):
                lines += ["", f"Note: {emb['note']}."]
        lines.append("")

    failed = [name for name, s in sections.items() if s.get("status") == "failed"]
    if failed:
        lines += ["## Failures", ""]
        for name in failed:
            lines.append(f"- `{name}`: {sections[name].get('error')}")
        lines.append("")
    return "\n".join(lines)
