"""Prompt encoding for text-conditioned Stable Diffusion UNets (CLIP tokenizer(s) + text encoder(s)).

SD 1.x / 2.x: hidden = text_encoder(ids).last_hidden_state -> (1, L, D) (what StableDiffusionPipeline feeds the
UNet's cross-attention). SDXL: the penultimate hidden states of both encoders concatenated -> (1, L, D1 + D2),
the pooled projection of the second -> (1, D2), and the time ids (original size, crop top-left, target size)
-> (1, 6) (StableDiffusionXLPipeline._get_add_time_ids without the aesthetic score).
The encoders may stay on the CPU (`device`), only the embeddings travel to the UNet's device: they run once
per prompt, so keeping them off the GPU costs nothing per step (text-encoder offload).
"""

from __future__ import annotations

import torch


class PromptEncoder:
    """prompt (str) -> {"hidden": (1, L, D)} (+ "pooled" (1, D2), "time_ids" (1, 6) for SDXL)."""

    def __init__(self, tokenizers: list, encoders: list, sdxl: bool = False, device="cpu",
                 size: tuple[int, int] | None = None):
        if len(tokenizers) != len(encoders) or not encoders:
            raise ValueError("a PromptEncoder needs one tokenizer per text encoder")
        if sdxl and len(encoders) != 2:
            raise ValueError("SDXL conditioning needs two text encoders (text_encoder/ and text_encoder_2/)")
        self.tokenizers, self.encoders, self.sdxl = tokenizers, encoders, sdxl
        self.device = torch.device(device)
        self.size = size
        for enc in encoders:
            enc.to(self.device).eval().requires_grad_(False)

    def to(self, device) -> "PromptEncoder":
        self.device = torch.device(device)
        for enc in self.encoders:
            enc.to(self.device)
        return self

    def _ids(self, tokenizer, prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.device)  # (1, L)

    @torch.no_grad()
    def __call__(self, prompt: str, size: tuple[int, int] | None = None) -> dict:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not self.sdxl:
            out = self.encoders[0](self._ids(self.tokenizers[0], prompt))
            return {"hidden": out.last_hidden_state.float()}  # (1, L, D)
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            out = enc(self._ids(tok, prompt), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled = out.text_embeds.float() if hasattr(out, "text_embeds") else out[0].float()  # (1, D2) of the 2nd
        h, w = size or self.size or (1024, 1024)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device)  # (1, 6)
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled, "time_ids": time_ids}
