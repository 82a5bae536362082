"""Section `lang`: our lang stage's training step against a plain HuggingFace step of the same LM on the same
tokens.

Ours: the real `LangStage` built from the recipe (recipes/lang.yaml + the preset's scale, the blind baseline
off so both sides train one LM), the embedded SmolLM2-135M-Instruct (`lang.lm`, converted once into data/lm)
or `--overrides lang.lm=PATH`, through the minimal loop (bench/step.py `loop_step`). The batch: B shapes-world
scenes (random pixels, the world's question templates, all turns) tokenized by the stage's own TurnEncoder,
so the lengths, image tokens and answer masks are those of a real step. Rows:
  ours: warm-up     projector only: encoder under no_grad, the LM's backward without weight gradients
  ours: full        encoder + projector + LM (LayerScale, DropPath), the stage's AdamW
  HF: plain step    `lm(inputs_embeds=..., attention_mask=..., labels=...)` (full-vocabulary logits at every
                    position, HF's own shifted loss), backward, AdamW over the LM: the same inputs_embeds
                    (the image rows precomputed once), same batch, no encoder, no projector
samples/s and tokens/s (non-padding tokens per second) for each; ours / HF is our overhead (or saving: our
loss computes the LM head only at answer positions).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.common import autocast, error_record, free_memory, rss_bytes, steps_table, time_loop


def lang_batch(stage, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """B tokenized shapes-world samples (all turns of a scene) with random images, as the stage's loader
    hands them (right-padded to max_length; the stage trims)."""
    from pe_lightning.data.shapes.qa import scene_qa
    from pe_lightning.data.shapes.scenes import sample_scene

    rng = np.random.default_rng(seed)
    encoder = stage.turn_encoder()
    samples = [encoder.encode(scene_qa(sample_scene(rng, 64), rng)) for _ in range(batch_size)]
    batch = encoder.collate(samples)
    size = stage.cfg.data.image_size
    batch["image"] = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _row(name: str, res: dict, samples: int, tokens: int) -> dict:
    return {"name": name, **res, "status": "ok", "step_ms": res["step_s"] * 1000,
            "samples_per_s": samples / res["step_s"], "tokens_per_s": tokens / res["step_s"]}


def bench_lang(ctx) -> dict:
    from bench.step import loop_step
    from pe_lightning.stages import load_stage_recipe
    from pe_lightning.stages.lang import LangStage

    device = ctx.device
    batch_size = 8 if device.type != "cuda" else 64
    overrides = [f"model={ctx.preset if device.type == 'cuda' else 'tiny'}", "lang.blind_baseline=false",
                 "train.total_samples=1000000000000", f"train.batch_size={batch_size}", "data.chunk_size=8",
                 f"trainer.precision={ctx.precision}", *ctx.overrides]
    section: dict[str, Any] = {"status": "ok", "batch": batch_size, "recipe_overrides": overrides, "rows": []}
    ctx.publish(section)
    free_memory(device)
    baseline = rss_bytes()
    for phase in ("warm-up", "full"):
        split = "1000000000000" if phase == "warm-up" else "0"
        cfg = load_stage_recipe("lang", [*overrides, f"lang.projector_samples={split}"])
        torch.manual_seed(cfg.seed)
        stage = LangStage(cfg)
        batch = lang_batch(stage, batch_size, device)
        tokens = int(batch["attention_mask"].sum())
        section.update(tokens_per_sample=tokens / batch_size, image_tokens=stage.num_image_tokens,
                       lm=type(stage.model.lm).__name__, lm_params=sum(p.numel() for p in stage.model.lm.parameters()))
        name = f"ours: {phase} ({batch_size} samples, {tokens} tokens)"
        print(f"[bench] lang: {name} ...", flush=True)
        try:
            with loop_step(stage, batch, device, ctx.precision) as step:
                res = time_loop(step, device, ctx.warmup, ctx.steps, baseline)
            section["rows"].append(_row(name, res, batch_size, tokens))
        except Exception as err:
            section["rows"].append({"name": name, **error_record(err)})
        ctx.checkpoint()
        if phase == "full":
            section["rows"].append(_hf_row(ctx, stage, batch, baseline))
            ctx.checkpoint()
        stage.cpu()
        del stage
        free_memory(device)
    return section


def _hf_row(ctx, stage, batch: dict, baseline: int) -> dict:
    """A plain HF training step of the same LM on the same inputs_embeds (image rows precomputed once)."""
    from pe_lightning.models.llm import embed_inputs, trim_padding

    device = ctx.device
    b = trim_padding(batch)
    tokens = int(b["attention_mask"].sum())
    name = f"HF: plain step ({len(b['input_ids'])} samples, {tokens} tokens)"
    print(f"[bench] lang: {name} ...", flush=True)
    try:
        lm = stage.model.lm.to(device).train()
        with torch.no_grad():
            image = stage.model.projector(stage.model.patch_tokens(b["image"]))
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5, betas=(0.9, 0.95), **fused)

        def step(i: int) -> None:
            with autocast(device, ctx.precision):
                embeds = embed_inputs(lm, b["input_ids"], image, b["image_positions"])
                loss = lm(inputs_embeds=embeds, attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        row = _row(name, time_loop(step, device, max(2, ctx.warmup // 2), ctx.steps, baseline), len(b["input_ids"]),
                   tokens)
        del optimizer
        return row
    except Exception as err:
        return {"name": name, **error_record(err)}


def lang_lines(sec: dict) -> list[str]:
    """The report's `lang` table."""
    lines = ["## Lang step: warm-up / full (ours) vs a plain HuggingFace step of the same LM", ""]
    if sec.get("status") != "ok":
        return lines + [f"{sec.get('status')}: {sec.get('error', '')}", ""]
    lines += [f"LM {sec.get('lm')} ({sec.get('lm_params', 0) / 1e6:.0f}M parameters), batch {sec['batch']}, "
              f"{sec.get('tokens_per_sample', 0):.0f} tokens per sample ({sec.get('image_tokens')} image tokens); "
              "minimal loop, shapes-world token batch, random images.", ""]
    lines += steps_table(sec.get("rows", []), ["samples/s", "tokens/s"],
                         lambda r: [f"{r['samples_per_s']:,.2f}", f"{r['tokens_per_s']:,.0f}"])
    ok = {r["name"].split(" (")[0]: r for r in sec.get("rows", []) if r.get("status") == "ok"}
    if "ours: full" in ok and "HF: plain step" in ok:
        ratio = ok["ours: full"]["tokens_per_s"] / ok["HF: plain step"]["tokens_per_s"]
        lines.append(f"\nours (full) / HF plain: **{ratio:.2f}x** tokens/s.")
    return lines + [""]
