"""NVIDIA DALI decode + tiling: GPU (``mixed``) decode on CUDA, a CPU pipeline (``device_id=None``) otherwise.

Geometry (which region each view samples, its resized size and crop offset) is computed in Python from the image
header (``decode.probe_header``) with ``geometry.view_geometry`` — the same numbers the PIL path uses — and fed per
sample, so both decoders cut identical regions; only the resampling filter implementation differs (DALI cubic vs
PIL bicubic, both antialiased). Views of extreme aspect ratio are fed as the direct resample of the region their
crop keeps (``bounded=True``), so DALI never builds their full-size intermediate. A block DALI cannot decode is
redone through PIL, image by image, so one bad file never stops a run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .decode import failure_reason, pil_views_or_reason, probe_header
from .geometry import ViewSpec, view_geometry
from .source import ViewBatch, default_workers, prefetched


def _build_pipeline(spec: ViewSpec, batch_size: int, num_threads: int, device_id: int | None):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN,
              "lanczos": types.INTERP_LANCZOS3}[spec.interpolation]
    crop = np.array([spec.image_size, spec.image_size], dtype=np.float32)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_dynamic=True,
                  prefetch_queue_depth=1)
    def views_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        geom = fn.external_source(name="geometry", dtype=types.FLOAT, ndim=2)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        outs = []
        for j in range(spec.num_views):
            v = fn.resize(image, roi_start=geom[j, 0:2], roi_end=geom[j, 2:4], size=geom[j, 4:6],
                          roi_relative=False, interp_type=interp, antialias=True)
            outs.append(fn.slice(v, geom[j, 6:8], types.Constant(crop), axes=[0, 1], normalized_anchor=False,
                                 normalized_shape=False, out_of_bounds_policy="trim_to_shape"))
        return fn.stack(*outs)

    pipe = views_pipeline()
    pipe.build()
    return pipe


class DaliViews:
    """Decode + tile with DALI in a background thread, ``prefetch`` blocks ahead of the consumer."""

    name = "dali"

    def __init__(self, paths: Sequence[Path], spec: ViewSpec, *, device: torch.device, batch_size: int,
                 workers: int | None = None, prefetch: int = 2) -> None:
        self.paths = list(paths)
        self.spec = spec
        self.batch_size = batch_size
        self.device = device
        self.num_threads = workers or default_workers()
        self.prefetch = prefetch
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = _build_pipeline(self.spec, self.batch_size, self.num_threads, self.device_id)
        return self._pipe

    def _pil_block(self, k: int, block: np.ndarray, failed: list[tuple[int, str]]) -> ViewBatch:
        rows, views = [], []
        done = {f for f, _ in failed}
        for r in block.tolist():
            if r in done:
                continue
            v, why = pil_views_or_reason(self.paths[r], self.spec)
            if v is None:
                failed.append((r, why))
            else:
                views.append(v)
                rows.append(r)
        t = torch.from_numpy(np.stack(views)) if views else torch.empty((0,), dtype=torch.uint8)
        if self.device.type == "cuda":
            t = t.to(self.device, non_blocking=True)
        return ViewBatch(block=k, rows=np.asarray(rows, dtype=np.int64), views=t, failed=sorted(failed))

    def _run_block(self, k: int, block: np.ndarray) -> ViewBatch:
        encoded, geoms, rows, failed = [], [], [], []
        for r in block.tolist():
            try:
                data = Path(self.paths[r]).read_bytes()
                geoms.append(view_geometry(*probe_header(data).oriented_size, self.spec, bounded=True))
                encoded.append(np.frombuffer(data, dtype=np.uint8))
                rows.append(r)
            except Exception as exc:  # noqa: BLE001 - the decode policy: a reason, never an exception
                failed.append((r, failure_reason(self.paths[r], exc)))
        if not rows:
            return ViewBatch(block=k, rows=np.empty(0, np.int64), views=torch.empty((0,), dtype=torch.uint8),
                             failed=failed)
        try:
            pipe = self._pipeline()
            pipe.feed_input("encoded", encoded)
            pipe.feed_input("geometry", geoms)
            (out,) = pipe.run()
        except Exception:
            self._pipe = None  # a pipeline that raised is not reused; redo this block image by image
            return self._pil_block(k, block, failed)
        shape = (len(rows), self.spec.num_views, self.spec.image_size, self.spec.image_size, 3)
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            views = torch.empty(shape, dtype=torch.uint8, device=self.device)
            feed_ndarray(out.as_tensor(), views, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            views = torch.from_numpy(np.array(out.as_array(), copy=True)).reshape(shape)
        return ViewBatch(block=k, rows=np.asarray(rows, dtype=np.int64), views=views, failed=failed)

    def batches(self, blocks: list[np.ndarray]) -> Iterator[ViewBatch]:
        return prefetched(lambda: (self._run_block(k, b) for k, b in enumerate(blocks)), self.prefetch, "cdul-dali")
