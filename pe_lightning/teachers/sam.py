"""`sam2`: SAM 2.1 mask logits for a grid of single-point prompts, run with the installed `sam2` package.

What runs (the real SAM 2.1 code, nothing re-implemented):
1. `sam2.build_sam.build_sam2(config)` with one of the package's shipped configs (`configs/sam2.1/
   sam2.1_hiera_{t,s,b+,l}.yaml`; short names `tiny | small | base_plus | large` or `t | s | b+ | l`), its input
   resolution overridden by `image_size` (SAM's native 1024 by default; any multiple of 32 builds and runs,
   e.g. 64 for CPU tests). Weights: the user's SAM 2.1 checkpoint (`{"model": state_dict}`, as Meta ships
   `sam2.1_hiera_large.pt`), loaded strictly. They cannot be downloaded here: a missing path is an error, and
   random weights need `random_weights=True` (tests and benchmarks only).
2. The image: our eval normalisation ([-1, 1]) -> [0, 1] -> resized to image_size x image_size (bilinear,
   antialiased, like SAM2Transforms) -> ImageNet mean/std. `forward_image` + `_prepare_backbone_features`
   (+ `no_mem_embed`, as SAM2ImagePredictor does for single images).
3. The prompts: the n x n grid of masklogits.point_grid, one positive point per prompt, mapped to SAM's input
   frame; SAM's prompt encoder adds 0.5 to treat coordinates as pixel indices, so we pass `x - 0.5` and the
   encoded position is the exact cell centre. Chunks of `chunk` prompts go through `sam_prompt_encoder` and
   `sam_mask_decoder(multimask_output=False, repeat_image=True)` (with the package's default
   `dynamic_multimask_via_stability`, SAM 2's single-click behaviour).
4. The output: the decoder's **low-res logits** (image_size / 4 per side: 256 x 256 at 1024), clamped to
   [-32, 32] as SAM2ImagePredictor does, fp32, optionally resized (masklogits.resize_logits) chunk by chunk.
On CUDA the model runs under bf16 autocast (`dtype`), on CPU in fp32.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from pe_lightning.teachers.masklogits import MaskLogitTeacher, TeacherError, register_teacher, resize_logits

__all__ = ["SAM2Teacher", "SAM2_CONFIGS", "resolve_config"]

SAM2_CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
_ALIASES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large", "hiera_t": "tiny", "hiera_s": "small",
            "hiera_b+": "base_plus", "hiera_l": "large"}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LOGIT_CLAMP = 32.0


def resolve_config(config: str) -> str:
    """A short name (`tiny`, `l`, ...) or a package config path -> the package config path."""
    name = _ALIASES.get(config, config)
    if name in SAM2_CONFIGS:
        return SAM2_CONFIGS[name]
    if config.startswith("configs/") and config.endswith(".yaml"):
        return config
    raise TeacherError(f"unknown SAM 2.1 config {config!r}; use one of {sorted(SAM2_CONFIGS)} or a path inside "
                       "the sam2 package such as configs/sam2.1/sam2.1_hiera_l.yaml")


def _checkpoint_error(message: str) -> Exception:
    # imported here: pe_lightning.models pulls in timm, seconds of import time the oracle path never needs
    from pe_lightning.models.checkpoint import CheckpointError

    return CheckpointError(message)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _missing_message(ckpt_path: str) -> str:
    return (f"SAM 2.1 checkpoint {ckpt_path} not found; download it from Meta's sam2 release (e.g. "
            "sam2.1_hiera_large.pt) on a machine with network and pass its path")


def _load_weights(model: torch.nn.Module, ckpt_path: str, config: str) -> None:
    if not os.path.isfile(ckpt_path):
        raise _checkpoint_error(_missing_message(ckpt_path))
    try:
        blob = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _checkpoint_error(f"cannot read SAM 2.1 checkpoint {ckpt_path}: {type(e).__name__}: {e}") from None
    sd = blob.get("model") if isinstance(blob, dict) else None
    if not isinstance(sd, dict):
        raise _checkpoint_error(f"{ckpt_path} is not a SAM 2.1 checkpoint (expected a dict with a 'model' state dict)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise _checkpoint_error(f"{ckpt_path} does not match {config}: {len(missing)} missing keys (first: "
                              f"{missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]}); pick the "
                              "config of the same size as the checkpoint (tiny / small / base_plus / large)")


@register_teacher("sam2")
class SAM2Teacher(MaskLogitTeacher):
    """`SAM2Teacher(ckpt_path, config="large", image_size=1024, grid=32, chunk=256)(images) -> [B, n*n, s/4, s/4]`."""

    def __init__(self, ckpt_path: Optional[str] = None, config: str = "large", image_size: int = 1024,
                 grid: int = 32, chunk: int = 256, device: Optional[str] = None,
                 dtype: torch.dtype | str = torch.bfloat16, random_weights: bool = False):
        super().__init__(grid)
        if int(image_size) <= 0 or int(image_size) % 32:
            raise TeacherError(f"sam2 image_size must be a positive multiple of 32 (Hiera's stride), got {image_size}")
        if ckpt_path is None and not random_weights:
            raise _checkpoint_error("the sam2 teacher needs SAM 2.1 weights: pass ckpt_path (e.g. "
                                    "sam2.1_hiera_large.pt; it cannot be downloaded here), or use the oracle teacher")
        if ckpt_path is not None and not os.path.isfile(ckpt_path):  # before the (slow) build
            raise _checkpoint_error(_missing_message(ckpt_path))
        self.config = resolve_config(config)
        self.image_size = int(image_size)
        self.chunk = max(1, int(chunk))
        self.device_name = device or _default_device()
        self.amp_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = self._build(ckpt_path)
        self.requires_grad_(False)

    def _build(self, ckpt_path: Optional[str]) -> torch.nn.Module:
        try:
            from sam2.build_sam import build_sam2
        except ImportError as e:
            raise TeacherError(f"the sam2 teacher needs the `sam2` package (SAM 2.1): {e}") from None
        model = build_sam2(self.config, None, device="cpu", mode="eval",
                           hydra_overrides_extra=[f"++model.image_size={self.image_size}"])
        if ckpt_path is not None:
            _load_weights(model, ckpt_path, self.config)
        return model.to(self.device_name).eval()

    def logit_size(self) -> tuple[int, int]:
        s = self.model.sam_image_embedding_size * 4  # the decoder upsamples the embedding 4x
        return s, s

    def _autocast(self):
        if str(self.device_name).startswith("cuda") and self.amp_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return torch.autocast("cpu", enabled=False)

    def _sam_input(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device_name, torch.float32) * 0.5 + 0.5  # eval normalisation -> [0, 1]
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m = self.model
        backbone_out = m.forward_image(x)
        _, feats, _, sizes = m._prepare_backbone_features(backbone_out)
        if m.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + m.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(x.shape[0], -1, *hw) for f, hw in zip(feats, sizes)]
        return maps[-1], maps[:-1]

    def _decode(self, embed: torch.Tensor, high_res: list[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
        m = self.model
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        sparse, dense = m.sam_prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
        low_res, _, _, _ = m.sam_mask_decoder(
            image_embeddings=embed, image_pe=m.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False, repeat_image=True, high_res_features=high_res)
        return low_res[:, 0].float().clamp_(-_LOGIT_CLAMP, _LOGIT_CLAMP)

    def logits(self, images: torch.Tensor, points: torch.Tensor, out_size: Optional[tuple[int, int]],
               **_) -> torch.Tensor:
        b, _, h, w = images.shape
        scale = torch.tensor([self.image_size / w, self.image_size / h])
        coords = (points * scale - 0.5).to(self.device_name)  # the prompt encoder adds the 0.5 back
        size = out_size or self.logit_size()
        out = torch.empty(b, points.shape[0], *size, dtype=torch.float32)
        with self._autocast():
            embed, high_res = self._features(self._sam_input(images))
            for i in range(b):
                hr = [f[i:i + 1] for f in high_res]
                for start in range(0, coords.shape[0], self.chunk):
                    part = self._decode(embed[i:i + 1], hr, coords[start:start + self.chunk])
                    out[i, start:start + part.shape[0]] = resize_logits(part[None], size)[0].cpu()
        return out
