"""Supervision views and the step-indexed loaders that feed them.

A method declares what supervision it ``needs``; the runner turns that into views, one per kind
in the table of ``bench/supervision.py`` (which names the dataset class of each):

==================  =====================================  =====================================
need                view name                              what a batch holds
==================  =====================================  =====================================
pixel_labels        ``labeled``  (labeled ids)             image, mask, index
unlabeled_images    ``unlabeled`` (train ids not labeled)  image, valid, index
image_tags          ``tagged``   (all train ids)           image, valid, tags (multi-hot), index
(nothing)           ``images``   (all train ids)           image, valid, index
==================  =====================================  =====================================

``valid`` (bool [H, W]) is False where the crop is padding rather than image (a zoom-out smaller
than the crop), as UniMatch's ``ignore_mask`` leaves padding out of the unsupervised losses; it is
made from the image's own size, never from a mask. Only ``LabeledDataset`` can open a mask; the
other datasets are never given a way to, so pixel labels outside the labeled split cannot reach a method whatever it does.

Determinism: the order and the augmentation of every sample are functions of (run seed, view,
position in the stream) only, so a run resumed at step ``s`` sees exactly the batches an
uninterrupted run sees from step ``s`` on, whatever the number of workers.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.data.folder import FolderSource

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

def mix_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float, ImageNet-normalised."""
    return (image.float() / 255.0 - MEAN) / STD


class TrainAugment:
    """Random scale, pad-to-crop (image 0, mask ignore), random crop, horizontal flip.

    Uses an explicit generator, never the global RNG, so model randomness is untouched.
    """

    def __init__(self, crop: int, scale: tuple[float, float], ignore_index: int = 255):
        self.crop, self.scale, self.ignore = crop, scale, ignore_index

    def __call__(self, image, mask, generator: torch.Generator):
        h, w = image.shape[-2:]
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand((), generator=generator).item()
        size = [max(1, round(h * s)), max(1, round(w * s))]
        image = TF.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        if mask is not None:
            mask = TF.resize(mask[None], size, interpolation=v2.InterpolationMode.NEAREST)[0]
        ph, pw = max(0, self.crop - size[0]), max(0, self.crop - size[1])
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0)
            if mask is not None:
                mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.crop + 1, (), generator=generator))
        left = int(torch.randint(0, w - self.crop + 1, (), generator=generator))
        image = image[:, top:top + self.crop, left:left + self.crop]
        if mask is not None:
            mask = mask[top:top + self.crop, left:left + self.crop]
        if torch.rand((), generator=generator).item() < 0.5:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return image, mask


class ResizeCenterCrop:
    """Deterministic: shorter side resized to ``crop``, centre crop (for methods that make their own
    views; every image of a batch then has the same size)."""

    def __init__(self, crop: int, ignore_index: int = 255):
        self.crop, self.ignore = crop, ignore_index

    def __call__(self, image, mask, generator=None):
        h, w = image.shape[-2:]
        if min(h, w) != self.crop:
            size = [max(self.crop, round(h * self.crop / min(h, w))), max(self.crop, round(w * self.crop / min(h, w)))]
            image = TF.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            if mask is not None:
                mask = TF.resize(mask[None], size, interpolation=v2.InterpolationMode.NEAREST)[0]
        h, w = image.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        image = image[:, top:top + self.crop, left:left + self.crop]
        if mask is not None:
            mask = mask[top:top + self.crop, left:left + self.crop]
        return image, mask


class _ViewDataset(Dataset):
    """Indexed by (position in the id list, sample seed) pairs from ``StepBatchSampler``."""

    def __init__(self, source: FolderSource, ids: list[str], augment: TrainAugment | None):
        self.source, self.ids, self.augment = source, list(ids), augment

    def __len__(self):
        return len(self.ids)

    def _image(self, index: int, mask, seed: int):
        image = self.source.load_image(self.ids[index])
        if self.augment is not None:
            image, mask = self.augment(image, mask, torch.Generator().manual_seed(seed))
        return normalize(image), mask


class LabeledDataset(_ViewDataset):
    def __getitem__(self, key):
        index, seed = key
        image, mask = self._image(index, self.source.load_mask(self.ids[index]), seed)
        return {"image": image, "mask": mask, "index": index}


class ImageDataset(_ViewDataset):
    """Images only: used for unlabeled and unsupervised views. It has no mask loader."""

    def __init__(self, source: FolderSource, ids: list[str], augment: TrainAugment | None):
        super().__init__(_ImagesOnly(source), ids, augment)

    def __getitem__(self, key):
        index, seed = key
        image = self.source.load_image(self.ids[index])
        # a map of the image's extent, augmented with it: the augmentation pads it with the ignore
        # value like a mask, and draws the same random numbers whether or not it is given one
        extent = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        if self.augment is not None:
            image, extent = self.augment(image, extent, torch.Generator().manual_seed(seed))
        return {"image": normalize(image), "valid": extent == 0, "index": index}


class TaggedDataset(ImageDataset):
    """Images with image-level tags; the tags were derived from masks before the method existed."""

    def __init__(self, source: FolderSource, ids: list[str], augment: TrainAugment | None, tags: torch.Tensor):
        super().__init__(source, ids, augment)
        self.tags = tags

    def __getitem__(self, key):
        item = super().__getitem__(key)
        item["tags"] = self.tags[key[0]]
        return item


class _ImagesOnly:
    """A view of a source that can load images but not masks."""

    def __init__(self, source: FolderSource):
        self.load_image = source.load_image


class StepBatchSampler(Sampler):
    """Yields, for each step in [start_step, total_steps), a batch of (index, sample seed) pairs.

    The stream is the concatenation of per-epoch permutations; batches may straddle epochs, so any
    dataset size works with any batch size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, view: str, start_step: int, total_steps: int,
                 rank: int = 0, world: int = 1):
        if n == 0:
            raise ValueError(f"view {view!r} has no images")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} of view {view!r} does not split over {world} processes")
        self.n, self.bs, self.seed, self.view = n, batch_size, seed, view
        self.start, self.total = start_step, total_steps
        self.rank, self.world = rank, world  # under torchrun: this rank takes every world-th sample

    def __len__(self):
        return max(0, self.total - self.start)

    def epoch_of(self, step: int) -> int:
        return step * self.bs // self.n

    def __iter__(self):
        epoch, perm = -1, None
        for step in range(self.start, self.total):
            batch = []
            for pos in range(step * self.bs + self.rank, (step + 1) * self.bs, self.world):
                e = pos // self.n
                if e != epoch:
                    epoch = e
                    gen = torch.Generator().manual_seed(mix_seed(self.seed, self.view, "epoch", e))
                    perm = torch.randperm(self.n, generator=gen).tolist()
                batch.append((perm[pos % self.n], mix_seed(self.seed, self.view, "sample", pos)))
            yield batch


def make_loader(dataset: Dataset, batch_size: int, seed: int, view: str, start_step: int, total_steps: int,
                num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), batch_size, seed, view, start_step, total_steps, rank, world)
    # a generator of its own: a DataLoader iterator otherwise draws its base seed from the global
    # RNG, which would shift the methods' random stream between a fresh and a resumed run
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def whole_set_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """Every item of a view's dataset once, in order (sample seed 0), for a method's passes over the
    whole set (clustering, mining)."""
    return DataLoader(dataset, sampler=[(i, 0) for i in range(len(dataset))], batch_size=batch_size)
