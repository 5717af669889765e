"""Stream a sharded dataset into training: WebDataset over the manifest's shard URLs.

Order of a pass (one epoch on one rank):
1. the split's shard list is shuffled with a seed derived from (seed, epoch), identically on every rank;
2. rank r of W takes shards r, r+W, ... (what `webdataset.split_by_node` does, with explicit values
   or, when none are given, RANK/WORLD_SIZE or torch.distributed as Ray Train sets them up);
3. DataLoader worker w of K takes every K-th of those (`webdataset.split_by_worker`);
4. samples pass a shuffle buffer seeded from (seed, epoch, rank, worker), are decoded, batched, and
   scaled to x = 2·v/(L−1) − 1 with L the manifest's `levels`, optionally flipped left-right.
   uint8 shards (manifest image.encoding) hold each shard's samples as one array: they are split
   into samples instead of decoded, and give the same batches as a PNG copy of the same dataset.
The same (seed, epoch, world size, workers) therefore gives the same batches, so a resumed run sees a
reproducible order. s3://, gs://, az:// and memory:// shards open through fsspec inside each worker
process (`pipeline.storage`, one filesystem per process: s3fs is not fork-safe).
"""

from __future__ import annotations

import functools
import importlib
import io
import multiprocessing
import multiprocessing.context
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from pipeline import storage
from pipeline.data import manifest as mf

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> io.IOBase:
    """WebDataset opener for object-store URLs: fsspec, with a filesystem made in this process."""
    return storage.open_uri(url, mode)


def register_gopen_handlers() -> None:
    """Route s3://, gs://, az://, memory:// shard URLs in WebDataset through fsspec."""
    # The package re-exports the function `gopen` under the module's name: fetch the module itself.
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in FSSPEC_SCHEMES:
        schemes[scheme] = _gopen_fsspec


register_gopen_handlers()


def _shard_error(exn: Exception) -> bool:
    """WebDataset error handler: a ValueError naming the shard (WebDataset appends its URL to args)."""
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and "." in a), "?")
    reason = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else exn)
    what = "missing" if isinstance(exn, FileNotFoundError) else "truncated or corrupt"
    raise ValueError(
        f"shard {url}: {what} ({type(exn).__name__}: {reason}); "
        "check it with pipeline.data.manifest.verify_manifest and rerun `shard` to rewrite it"
    ) from exn


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _node_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if rank is None or world_size is None:
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: give both or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return rank, world_size


class _Stages:
    """Picklable pipeline stages for one (seed, epoch, rank) pass (DataLoader workers may be spawned)."""

    def __init__(
        self,
        *,
        seed: int,
        epoch: int,
        rank: int,
        shuffle_buffer: int,
        flip: bool,
        levels: int,
        shape: tuple[int, ...],
        batch_size: int,
        drop_last: bool,
        with_index: bool,
        encoding: str = "png",
        scale: float = 1.0,
    ) -> None:
        self.encoding, self.scale = encoding, scale
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer, self.flip, self.levels = shuffle_buffer, flip, levels
        self.shape, self.batch_size, self.drop_last, self.with_index = (
            shape,
            batch_size,
            drop_last,
            with_index,
        )

    def rng(self, stream: int) -> random.Random:
        worker, _ = _worker()
        return random.Random(_seed(self.seed, self.epoch, self.rank, worker, stream))

    def shuffle(self, src: Iterator[dict]) -> Iterator[dict]:
        """Reservoir shuffle of up to `shuffle_buffer` samples (the WebDataset shuffle, seeded)."""
        if self.shuffle_buffer <= 1:
            yield from src
            return
        rng = self.rng(1)
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def decode(self, src: Iterator[dict]) -> Iterator[tuple[np.ndarray, int, int]]:
        from PIL import Image

        for sample in src:
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            try:
                with Image.open(io.BytesIO(sample["png"])) as im:
                    img = np.asarray(im, dtype=np.uint8)
                label, index = int(sample["cls"]), int(sample["idx"])
            except Exception as e:
                raise ValueError(f"sample {where}: unreadable ({type(e).__name__}: {e})") from e
            if img.ndim == 2:
                img = img[:, :, None]
            if img.shape != self.shape:
                raise ValueError(f"sample {where}: shape {img.shape}; the manifest says {self.shape}")
            yield img, label, index

    def unpack(self, src: Iterator[dict]) -> Iterator[tuple[np.ndarray, int, int]]:
        """uint8 shards: one group of arrays per shard, checked against the manifest, split into
        samples (views of one array; `batch` copies them into the batch)."""
        for group in src:
            where, key = group.get("__url__", "?"), group.get("__key__", "?")
            missing = [m for m in mf.UINT8_MEMBERS if m not in group]
            if missing:
                raise ValueError(f"shard {where}, key {key}: members {missing} missing (not a uint8 shard?)")
            images, labels, ids = (np.load(io.BytesIO(group[m])) for m in mf.UINT8_MEMBERS)  # no pickles
            mf.check_uint8_array(images.shape, images.dtype, shard=where, key=key, image_shape=self.shape,
                                 count=len(labels), expect="uint8" if self.encoding == "uint8" else "float16")
            if len(ids) != len(labels):
                raise ValueError(f"shard {where}, key {key}: {len(ids)} indices for {len(labels)} labels")
            yield from zip(images, labels.tolist(), ids.tolist(), strict=True)

    def batch(self, src: Iterator[tuple[np.ndarray, int, int]]) -> Iterator[tuple[torch.Tensor, ...]]:
        flips = self.rng(2)
        items: list[tuple[np.ndarray, int, int]] = []
        for item in src:
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items, flips)
                items = []
        if items and not self.drop_last:
            yield self._collate(items, flips)

    def _collate(self, items: list, flips: random.Random) -> tuple[torch.Tensor, ...]:
        v = np.stack([it[0] for it in items])  # [B, H, W, C] uint8
        if self.flip:
            mask = np.array([flips.random() < 0.5 for _ in items])
            v[mask] = v[mask, :, ::-1]
        if self.encoding == mf.LATENT_ENCODING:  # latents: z·scale_factor, no levels (issue 18)
            return self._out(torch.from_numpy(v.transpose(0, 3, 1, 2).astype(np.float32) * self.scale), items)
        # In numpy: torch's intra-op threads make this small conversion slow on a busy CPU.
        x = v.transpose(0, 3, 1, 2).astype(np.float32, order="C")  # [B, C, H, W]
        x *= np.float32(2.0 / (self.levels - 1))
        x -= np.float32(1.0)  # x = 2·v/(L−1) − 1
        return self._out(torch.from_numpy(x), items)

    def _out(self, x: torch.Tensor, items: list) -> tuple[torch.Tensor, ...]:
        labels = torch.tensor([it[1] for it in items], dtype=torch.long)
        if self.with_index:
            return x, labels, torch.tensor([it[2] for it in items], dtype=torch.long)
        return x, labels


def _worker_context() -> multiprocessing.context.BaseContext:
    """DataLoader workers start from a forkserver, not a fork of this process: a forked child
    inherits the parent's exit hooks and client state (Prefect's log service fails its exit hook in
    a fork and the worker dies with code 1; s3fs refuses to cross a fork). The server preloads the
    heavy imports once, so each worker still starts in well under a second."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "webdataset", "pipeline.data.loader"])
    return ctx


_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCSFS_", "AZURE_", "FSSPEC_")


def _storage_env() -> dict[str, str]:
    """This process's storage settings now: a forkserver child would otherwise see the environment
    the server started with. They travel over a local pipe to our own worker, never to storage or logs."""
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def _set_env(env: dict[str, str], worker_id: int) -> None:
    for k in [k for k in os.environ if k.startswith(_ENV_PREFIXES) and k not in env]:
        del os.environ[k]
    os.environ.update(env)


class Loader:
    """Batches (x float32 [B, C, H, W] in [-1, 1], labels long [B]) of one split, for one rank.

    Iterating makes one pass (epoch); `set_epoch(e)` picks the seed of the next pass. With
    `batches_per_epoch` every rank yields exactly that many batches (shards are cycled), which
    keeps DDP ranks in step when their shards hold different numbers of samples.
    """

    def __init__(
        self,
        manifest_uri: str,
        split: str = "train",
        batch_size: int = 128,
        *,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch: int = 0,
        flip: bool = False,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        batches_per_epoch: int | None = None,
        with_index: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer}: must be >= 0 (0 = no shuffling)")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: must be >= 0")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch={batches_per_epoch}: must be >= 1 or None")
        self.manifest_uri = mf.manifest_uri(manifest_uri)
        self.manifest = mf.read_manifest(self.manifest_uri)
        self.split = split
        self.entries = mf.shard_entries(self.manifest, split)
        self.root = mf.dataset_root(self.manifest_uri)
        self.rank, self.world_size = _node_info(rank, world_size)
        if len(self.entries) < self.world_size:
            raise ValueError(
                f"split={split!r} has {len(self.entries)} shards, fewer than world_size={self.world_size}: "
                "reshard with a smaller --shard-size so every rank gets at least one"
            )
        self.batch_size, self.shuffle_buffer, self.seed, self.epoch = batch_size, shuffle_buffer, seed, epoch
        self.flip, self.num_workers, self.drop_last = flip, num_workers, drop_last
        self.batches_per_epoch, self.with_index = batches_per_epoch, with_index
        self.levels = int(self.manifest["levels"])
        self.shape = tuple(self.manifest["image"]["shape"])
        self.encoding = mf.image_encoding(self.manifest)
        self.scale = float(self.manifest.get("latent", {}).get("scale_factor", 1.0))
        if self.encoding in ("uint8", mf.LATENT_ENCODING):  # array headers against the manifest, first
            mf.check_uint8_shards(self.manifest, self.root, self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next pass (shard order, shuffle buffer and flips all derive from it)."""
        self.epoch = int(epoch)

    def rank_shards(self, epoch: int | None = None) -> list[dict]:
        """This rank's shard entries for `epoch`, in reading order."""
        epoch = self.epoch if epoch is None else epoch
        order = list(range(len(self.entries)))
        if self.shuffle_buffer > 0:
            random.Random(_seed(self.seed, epoch, 2**31 - 1)).shuffle(order)  # same on every rank
        return [self.entries[i] for i in order[self.rank :: self.world_size]]

    def _workers(self, shards: list[dict]) -> int:
        return min(self.num_workers, len(shards))  # a worker without a shard would only idle

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        shards = self.rank_shards()
        k = max(1, self._workers(shards))
        total = 0
        for w in range(k):
            n = sum(s["count"] for s in shards[w::k])
            total += n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total

    @property
    def num_samples(self) -> int:
        """Samples this rank reads in the current epoch (before any batches_per_epoch cut)."""
        return sum(s["count"] for s in self.rank_shards())

    def _pipeline(self, epoch: int, shards: list[dict]) -> wds.DataPipeline:
        stages = _Stages(
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            shuffle_buffer=self.shuffle_buffer,
            flip=self.flip,
            levels=self.levels,
            shape=self.shape,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            with_index=self.with_index,
            encoding=self.encoding,
            scale=self.scale,
        )
        urls = [storage.join(self.root, s["name"]) for s in shards]
        # The same shuffle sees the same sample sequence in either encoding, so a uint8 copy of a
        # dataset yields exactly the batches its PNG original does.
        if self.encoding in ("uint8", mf.LATENT_ENCODING):
            stages_ = (stages.unpack, stages.shuffle)
        else:
            stages_ = (stages.shuffle, stages.decode)
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_shard_error),
            *stages_,
            stages.batch,
        )

    def _one_pass(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        shards = self.rank_shards(epoch)
        workers = self._workers(shards)
        loader = torch.utils.data.DataLoader(
            self._pipeline(epoch, shards),
            batch_size=None,
            # A DataLoader iterator draws its base seed from `generator`, or else from the global torch
            # RNG. The global RNG is training state (dropout draws from it, and a resume restores it
            # mid-epoch before opening a new iterator): a draw from it here would shift every later
            # dropout mask of a resumed run. The stages are seeded by (seed, epoch, rank) anyway.
            generator=torch.Generator().manual_seed(_seed(self.seed, epoch, self.rank)),
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            multiprocessing_context=_worker_context() if workers else None,
            worker_init_fn=functools.partial(_set_env, _storage_env()) if workers else None,
        )
        yield from loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.batches_per_epoch is None:
            yield from self._one_pass(self.epoch)
            return
        # Cycle through further passes (seeded by epoch·2^20 + k) until the quota is met.
        n, k = 0, 0
        while n < self.batches_per_epoch:
            for batch in self._one_pass(self.epoch * (1 << 20) + k if k else self.epoch):
                yield batch
                n += 1
                if n == self.batches_per_epoch:
                    return
            k += 1


def make_loader(manifest_uri: str, split: str = "train", batch_size: int = 128, **kw) -> Loader:
    """A `Loader` over the dataset at `manifest_uri` (its folder or its manifest.json); see Loader."""
    return Loader(manifest_uri, split, batch_size, **kw)
