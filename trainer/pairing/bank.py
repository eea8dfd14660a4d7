"""The pairing bank: a ring of recent labeled samples (embeddings, uint8 pixels, class shares) that answers each
unlabeled embedding with its partner; and the pixel conversions the bank stores and gives back."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from shards.augment import MEAN, STD

from ..config import PairingConfig
from ..guidedmix import CLASS_CRITERIA, class_need, pair

# each report's weight against the running per-class score: about the last hundred pushes count
OVERLAP_DECAY = 0.99


class PairingBank:
    """A bounded ring of the most recent labeled samples: L2-normalised embeddings (float32), images
    (uint8, 3 x H x W), masks (uint8, H x W) and their class shares (float32, C), with the rank and step that
    pushed each; and the running per-class intersection and union that workers report (`need`).

    Everything lives on `device` as tensors: a worker's bank (`pairing.mode: worker`) on the worker's device,
    where a push, a query and its answer read no value back to the host (on a GPU, no wait for the device);
    its checks are of shapes and dtypes only. The service checks the values that reach it over the wire."""

    def __init__(self, cfg: PairingConfig, seed: int = 0, device="cpu"):
        self.cfg, self.capacity, self.device = cfg, cfg.bank_size, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.size = self.pushed = 0  # the ring's next slot is pushed % capacity
        self.embeddings = self.images = self.masks = self.shares = None  # allocated by the first push
        self.overlap = None  # 2 x C decayed sums of the reported intersections and unions
        self.steps = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self.ranks = torch.zeros(self.capacity, dtype=torch.int32, device=self.device)

    def _check_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.dtype != torch.float32 or embeddings.ndim != 2:
            raise ValueError(f"pairing: embeddings must be 2-D float32, got {embeddings.dtype} "
                             f"{tuple(embeddings.shape)}")
        if self.embeddings is not None and embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"pairing: embeddings have width {embeddings.shape[1]}, the bank holds width "
                             f"{self.embeddings.shape[1]}")
        return torch.nn.functional.normalize(embeddings.to(self.device), dim=1)

    def push(self, embeddings: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, rank: int, step: int,
             shares: Optional[torch.Tensor] = None, overlap: Optional[torch.Tensor] = None) -> None:
        """Add labeled samples (`shares`: N x C class shares of their masks, for the class criteria) and fold
        in the pushing worker's per-class `overlap` (2 x C intersection and union) on its labeled batch."""
        vectors = self._check_embeddings(embeddings)
        n = vectors.shape[0]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[1] != 3:
            raise ValueError(f"pairing: images must be uint8 N x 3 x H x W with N = {n}, got "
                             f"{images.dtype} {tuple(images.shape)}")
        if masks.dtype != torch.uint8 or masks.shape != (n, *images.shape[2:]):
            raise ValueError(f"pairing: masks must be uint8 {(n, *images.shape[2:])}, got {masks.dtype} "
                             f"{tuple(masks.shape)}")
        if self.embeddings is None:
            self.embeddings = torch.zeros(self.capacity, vectors.shape[1], device=self.device)
            self._allocate_pixels(images.shape[1:], masks.shape[1:])
        elif images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"pairing: images are {tuple(images.shape[2:])}, the bank holds "
                             f"{tuple(self.images.shape[2:])}")
        shares = self._check_classes("shares", shares, n)
        overlap = self._check_classes("overlap", overlap, 2)
        if shares is not None and self.shares is None:
            self.shares = torch.zeros(self.capacity, shares.shape[1], device=self.device)
        if overlap is not None:
            self.overlap = overlap if self.overlap is None else OVERLAP_DECAY * self.overlap + overlap
        slots = self._slots(self.pushed, n)  # a ring: the oldest entries give way
        kept = slice(n - len(slots), n)
        self.embeddings[slots] = vectors[kept]
        self.put_pixels(self.pushed, images, masks)
        if shares is not None:
            self.shares[slots] = shares[kept]
        self.steps[slots], self.ranks[slots] = step, rank
        self.pushed += n
        self.size = min(self.pushed, self.capacity)

    def _allocate_pixels(self, image_shape, mask_shape) -> None:
        self.images = torch.zeros(self.capacity, *image_shape, dtype=torch.uint8, device=self.device)
        self.masks = torch.zeros(self.capacity, *mask_shape, dtype=torch.uint8, device=self.device)

    def _slots(self, first: int, n: int) -> torch.Tensor:
        """Where the samples `first` .. `first + n - 1` in push order live (the latest of one slot wins)."""
        return torch.arange(max(first, first + n - self.capacity), first + n, device=self.device) % self.capacity

    def put_pixels(self, first: int, images: torch.Tensor, masks: torch.Tensor) -> None:
        """Store the images and masks of the samples `first` ... in push order: push's, and a rebuild's
        (`load_state_dict` leaves the pixels out, the stream reads them again)."""
        slots = self._slots(first, len(images))
        self.images[slots] = images[-len(slots):].to(self.device)
        self.masks[slots] = masks[-len(slots):].to(self.device)

    def state_dict(self) -> dict:
        """What the bank learnt from the model (embeddings, the running per-class overlap) and where its ring
        stands, on the host; the pixels stay out: they are the stream's, read again on resume (`put_pixels`)."""
        def host(tensor):
            return None if tensor is None else tensor.cpu()
        return {"capacity": self.capacity, "pushed": self.pushed, "embeddings": host(self.embeddings),
                "shares": host(self.shares), "overlap": host(self.overlap), "steps": host(self.steps),
                "ranks": host(self.ranks),
                "pixels": None if self.images is None else (tuple(self.images.shape[1:]), tuple(self.masks.shape[1:]))}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"pairing.bank_size: the checkpoint's bank holds {state['capacity']}, "
                             f"the config {self.capacity}")
        self.pushed, self.size = state["pushed"], min(state["pushed"], self.capacity)
        self.embeddings, self.shares, self.overlap, self.steps, self.ranks = (
            None if state[name] is None else state[name].to(self.device)
            for name in ("embeddings", "shares", "overlap", "steps", "ranks"))
        if state["pixels"] is not None:
            self._allocate_pixels(*state["pixels"])

    def _check_classes(self, name: str, value: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
        """A rows x C float32 tensor of per-class figures, on the bank's device; C is the bank's once it holds
        one."""
        if value is None:
            return None
        known = self.shares if self.shares is not None else self.overlap
        width = known.shape[1] if known is not None else None
        if value.dtype != torch.float32 or value.ndim != 2 or value.shape[0] != rows or width not in (None, value.shape[1]):
            raise ValueError(f"pairing: {name} must be float32 {rows} x {width or 'C'} per-class figures, got "
                             f"{value.dtype} {tuple(value.shape)}")
        return value.to(self.device)

    def need(self) -> Optional[torch.Tensor]:
        """Per class, 1 - the running IoU the workers report (1 where a class has not been seen)."""
        return None if self.overlap is None else class_need(self.overlap)

    def query(self, embeddings: torch.Tensor, step: int, shares: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> Optional[dict]:
        """The best-matching entry for each embedding (`shares`: the queries' predicted class shares, for
        `complement`): images, masks, their index, the pushing ranks and staleness (steps since insert), on the
        bank's device. None while the bank is empty, or while a class criterion lacks what it scores (no shares
        pushed or no need reported yet). Draws with `generator` (a micro-batch's), else the bank's own."""
        vectors = self._check_embeddings(embeddings)
        shares = self._check_classes("shares", shares, vectors.shape[0])
        if self.size == 0:
            return None
        candidate_shares = None if self.shares is None else self.shares[:self.size]
        need = self.need()
        if self.cfg.similarity in CLASS_CRITERIA and (
                candidate_shares is None or (shares if self.cfg.similarity == "complement" else need) is None):
            return None
        index = pair(vectors, self.embeddings[:self.size], self.cfg.similarity, self.cfg.topk, self.cfg.temperature,
                     self.generator if generator is None else generator, query_shares=shares,
                     candidate_shares=candidate_shares, need=need)
        return {"images": self.images[index], "masks": self.masks[index], "index": index,
                "ranks": self.ranks[index], "staleness": (step - self.steps[index]).clamp(min=0)}


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's mean and std as 1 x 3 x 1 x 1 tensors on `device`, copied there once: a copy from host memory
    at every push and query would make the host wait for a GPU each micro-batch."""
    return tuple(torch.as_tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images (B x 3 x H x W, any device) as the uint8 pixels the bank stores, on their device."""
    mean, std = _normalisation(images.device)
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


def mask_to_uint8(masks: torch.Tensor) -> torch.Tensor:
    """Class-id masks as the bank stores them: one byte a pixel (255 stays the ignore index)."""
    return masks.clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor, device) -> torch.Tensor:
    """The bank's uint8 pixels as normalised float images on `device`."""
    mean, std = _normalisation(torch.device(device))
    return (images.to(device).float() - mean) / std
