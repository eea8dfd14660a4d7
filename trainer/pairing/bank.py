"""The pairing bank: a ring of recent labeled samples (embeddings, uint8 pixels, class shares) that answers each
unlabeled embedding with its partner; and the pixel conversions the bank stores and gives back."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from shards.augment import MEAN, STD

from ..config import PairingConfig
from ..guidedmix import CLASS_CRITERIA, class_need, pair

# each report's weight against the running per-class score: about the last hundred pushes count
OVERLAP_DECAY = 0.99


class PairingBank:
    """A bounded ring of the most recent labeled samples: L2-normalised embeddings (float32), images
    (uint8, 3 x H x W), masks (uint8, H x W) and their class shares (float32, C), with the rank and step that
    pushed each; and the running per-class intersection and union that workers report (`need`)."""

    def __init__(self, cfg: PairingConfig, seed: int = 0):
        self.cfg, self.capacity = cfg, cfg.bank_size
        capacity = cfg.bank_size
        self.generator = torch.Generator().manual_seed(seed)
        self.size = self.pushed = 0  # the ring's next slot is pushed % capacity
        self.embeddings = self.images = self.masks = self.shares = None  # allocated by the first push
        self.overlap = None  # 2 x C decayed sums of the reported intersections and unions
        self.steps = np.zeros(capacity, np.int64)
        self.ranks = np.zeros(capacity, np.int32)

    def _check_embeddings(self, embeddings) -> torch.Tensor:
        if not isinstance(embeddings, np.ndarray) or embeddings.dtype != np.float32 or embeddings.ndim != 2:
            raise ValueError(f"pairing: embeddings must be a 2-D float32 array, got "
                             f"{getattr(embeddings, 'dtype', type(embeddings).__name__)} "
                             f"{getattr(embeddings, 'shape', '')}")
        if self.embeddings is not None and embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"pairing: embeddings have width {embeddings.shape[1]}, the bank holds width "
                             f"{self.embeddings.shape[1]}")
        if not np.isfinite(embeddings).all():
            raise ValueError("pairing: embeddings contain NaN or infinity")
        return torch.nn.functional.normalize(torch.from_numpy(embeddings.copy()), dim=1)  # Ray hands in read-only arrays

    def push(self, embeddings: np.ndarray, images: np.ndarray, masks: np.ndarray, rank: int, step: int,
             shares: Optional[np.ndarray] = None, overlap: Optional[np.ndarray] = None) -> None:
        """Add labeled samples (`shares`: N x C class shares of their masks, for the class criteria) and fold
        in the pushing worker's per-class `overlap` (2 x C intersection and union) on its labeled batch."""
        vectors = self._check_embeddings(embeddings)
        n = vectors.shape[0]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[1] != 3:
            raise ValueError(f"pairing: images must be uint8 N x 3 x H x W with N = {n}, got "
                             f"{images.dtype} {images.shape}")
        if masks.dtype != np.uint8 or masks.shape != (n, *images.shape[2:]):
            raise ValueError(f"pairing: masks must be uint8 {(n, *images.shape[2:])}, got {masks.dtype} {masks.shape}")
        if self.embeddings is None:
            self.embeddings = torch.zeros(self.capacity, vectors.shape[1])
            self.images = np.zeros((self.capacity, *images.shape[1:]), np.uint8)
            self.masks = np.zeros((self.capacity, *masks.shape[1:]), np.uint8)
        elif images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"pairing: images are {images.shape[2:]}, the bank holds {self.images.shape[2:]}")
        shares = self._check_classes("shares", shares, n)
        overlap = self._check_classes("overlap", overlap, 2)
        if shares is not None and self.shares is None:
            self.shares = torch.zeros(self.capacity, shares.shape[1])
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

    def _slots(self, first: int, n: int) -> np.ndarray:
        """Where the samples `first` .. `first + n - 1` in push order live (the latest of one slot wins)."""
        return np.arange(first, first + n)[-self.capacity:] % self.capacity

    def put_pixels(self, first: int, images: np.ndarray, masks: np.ndarray) -> None:
        """Store the images and masks of the samples `first` ... in push order: push's, and a rebuild's
        (`load_state_dict` leaves the pixels out, the stream reads them again)."""
        slots = self._slots(first, len(images))
        self.images[slots], self.masks[slots] = images[-len(slots):], masks[-len(slots):]

    def state_dict(self) -> dict:
        """What the bank learnt from the model (embeddings, the running per-class overlap) and where its ring
        stands; the pixels stay out: they are the stream's, read again on resume (`put_pixels`)."""
        return {"capacity": self.capacity, "pushed": self.pushed, "embeddings": self.embeddings,
                "shares": self.shares, "overlap": self.overlap, "steps": torch.from_numpy(self.steps.copy()),
                "ranks": torch.from_numpy(self.ranks.copy()),
                "pixels": None if self.images is None else (self.images.shape[1:], self.masks.shape[1:])}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"pairing.bank_size: the checkpoint's bank holds {state['capacity']}, "
                             f"the config {self.capacity}")
        self.pushed, self.size = state["pushed"], min(state["pushed"], self.capacity)
        self.embeddings, self.shares, self.overlap = state["embeddings"], state["shares"], state["overlap"]
        self.steps, self.ranks = state["steps"].numpy(), state["ranks"].numpy()
        if state["pixels"] is not None:
            self.images = np.zeros((self.capacity, *state["pixels"][0]), np.uint8)
            self.masks = np.zeros((self.capacity, *state["pixels"][1]), np.uint8)

    def _check_classes(self, name: str, value: Optional[np.ndarray], rows: int) -> Optional[torch.Tensor]:
        """A rows x C float32 array of per-class figures as a tensor; C is the bank's once it holds one."""
        if value is None:
            return None
        known = self.shares if self.shares is not None else self.overlap
        width = known.shape[1] if known is not None else None
        if (not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim != 2 or value.shape[0] != rows
                or width not in (None, value.shape[1]) or not np.isfinite(value).all()):
            raise ValueError(f"pairing: {name} must be a finite float32 array of {rows} x {width or 'C'} per-class "
                             f"figures, got {getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")
        return torch.from_numpy(value.copy())

    def need(self) -> Optional[torch.Tensor]:
        """Per class, 1 - the running IoU the workers report (1 where a class has not been seen)."""
        return None if self.overlap is None else class_need(self.overlap)

    def query(self, embeddings: np.ndarray, step: int, shares: Optional[np.ndarray] = None,
              generator: Optional[torch.Generator] = None) -> Optional[dict]:
        """The best-matching entry for each embedding (`shares`: the queries' predicted class shares, for
        `complement`): images, masks, the pushing ranks and staleness (steps since insert). None while the bank
        is empty, or while a class criterion lacks what it scores (no shares pushed or no need reported yet).
        Draws with `generator` (a micro-batch's), else the bank's own."""
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
                     candidate_shares=candidate_shares, need=need).cpu().numpy()
        return {"images": self.images[index], "masks": self.masks[index], "index": index,
                "ranks": self.ranks[index], "staleness": np.maximum(step - self.steps[index], 0)}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images (B x 3 x H x W, any device) as the uint8 pixels the bank stores, on their device."""
    mean = torch.as_tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


def mask_to_uint8(masks: torch.Tensor) -> torch.Tensor:
    """Class-id masks as the bank stores them: one byte a pixel (255 stays the ignore index)."""
    return masks.clamp(0, 255).to(torch.uint8)


def from_uint8(images: np.ndarray, device) -> torch.Tensor:
    mean = torch.as_tensor(MEAN).view(1, 3, 1, 1)
    std = torch.as_tensor(STD).view(1, 3, 1, 1)
    return ((torch.tensor(images).float() - mean) / std).to(device)  # a copy: Ray's arrays are read-only
