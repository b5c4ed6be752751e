"""Views cut on the label device: torchvision.io JPEG decode (nvJPEG on CUDA) + PIL-exact resampling with matmuls
(``views.resample``). On CPU this reproduces ``geometry.pil_views`` bit for bit; on CUDA the only difference left
is nvJPEG's decode versus libjpeg-turbo's."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .decode import Header, failure_reason, load_rgb, probe_header
from .geometry import ViewSpec
from .resample import check_interpolation, resample_views
from .source import ViewBatch, default_workers, prefetched


def exif_orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to an HWC tensor the way ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return img.flip(1)
    if orientation == 3:
        return img.flip(0, 1)
    if orientation == 4:
        return img.flip(0)
    if orientation == 5:
        return img.permute(1, 0, 2)
    if orientation == 6:
        return torch.rot90(img, k=-1, dims=(0, 1))
    if orientation == 7:
        return img.permute(1, 0, 2).flip(0, 1)
    if orientation == 8:
        return torch.rot90(img, k=1, dims=(0, 1))
    return img


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return list(out)


class TensorViews:
    """JPEG decode with ``torchvision.io.decode_jpeg`` on the label device (nvJPEG on CUDA, libjpeg-turbo on CPU),
    then PIL-exact tiling there; a background thread keeps ``prefetch`` blocks ready (its own CUDA stream).

    Files that are not plain RGB/grayscale JPEG (PNG, CMYK, ...) or that nvJPEG rejects go through PIL for that
    image only; undecodable files leave the block with a reason.
    """

    name = "tensor"

    def __init__(self, paths: Sequence[Path], spec: ViewSpec, *, device: torch.device, batch_size: int = 1,
                 workers: int | None = None, prefetch: int = 2) -> None:
        del batch_size  # blocks come from the caller; each is decoded in one batched call
        check_interpolation(spec)
        self.paths = list(paths)
        self.spec = spec
        self.device = device
        self.num_threads = workers or default_workers()
        self.prefetch = prefetch

    def _read(self, row: int) -> tuple[int, bytes | None, Header | None, str]:
        try:
            data = Path(self.paths[row]).read_bytes()
            return row, data, probe_header(data), ""
        except Exception as exc:  # noqa: BLE001 - the decode policy: a reason, never an exception
            return row, None, None, failure_reason(self.paths[row], exc)

    def _pil_image(self, row: int) -> torch.Tensor:
        arr = np.array(load_rgb(self.paths[row]), dtype=np.uint8)  # a writable copy
        return torch.from_numpy(arr).to(self.device)

    def _run_block(self, k: int, block: np.ndarray, pool) -> ViewBatch:
        items = list(pool.map(self._read, block.tolist()))
        failed = [(r, why) for r, data, _, why in items if data is None]
        ok = [(r, data, probe) for r, data, probe, _ in items if data is not None]
        jpeg_idx = [i for i, (_, _, header) in enumerate(ok) if header.plain_jpeg]
        decoded: dict[int, torch.Tensor] = {}
        if jpeg_idx:
            datas = [torch.frombuffer(bytearray(ok[i][1]), dtype=torch.uint8) for i in jpeg_idx]
            try:
                imgs = _decode_jpegs(datas, self.device)
                decoded.update({i: im for i, im in zip(jpeg_idx, imgs, strict=True)})
            except RuntimeError:  # one bad file fails the whole batched call: retry one by one
                for i, d in zip(jpeg_idx, datas, strict=True):
                    try:
                        decoded[i] = _decode_jpegs([d], self.device)[0]
                    except RuntimeError:
                        pass  # PIL below gives the image a second chance (and the error message)
        rows, views = [], []
        for i, (r, _, header) in enumerate(ok):
            try:
                if i in decoded:
                    img = exif_orient(decoded[i].permute(1, 2, 0), header.orientation)
                else:
                    img = self._pil_image(r)
                views.append(resample_views(img, self.spec))
                rows.append(r)
            except Exception as exc:  # noqa: BLE001 - the decode policy: a reason, never an exception
                failed.append((r, failure_reason(self.paths[r], exc)))
        t = torch.stack(views) if views else torch.empty((0,), dtype=torch.uint8, device=self.device)
        return ViewBatch(block=k, rows=np.asarray(rows, dtype=np.int64), views=t, failed=sorted(failed))

    def batches(self, blocks: list[np.ndarray]) -> Iterator[ViewBatch]:
        from concurrent.futures import ThreadPoolExecutor

        cuda = self.device.type == "cuda"
        consumer_stream = torch.cuda.current_stream(self.device) if cuda else None

        def produce() -> Iterator[ViewBatch]:
            stream = torch.cuda.Stream(self.device) if cuda else None
            with (ThreadPoolExecutor(self.num_threads, thread_name_prefix="cdul-read") as pool,
                  torch.cuda.stream(stream) if cuda else contextlib.nullcontext()):
                for k, block in enumerate(blocks):
                    batch = self._run_block(k, block, pool)
                    if cuda:
                        batch.views.record_stream(consumer_stream)  # freed only after the consumer's use
                        stream.synchronize()
                    yield batch

        return prefetched(produce, self.prefetch, "cdul-tensor")
