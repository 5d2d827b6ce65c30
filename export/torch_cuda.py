"""`CudaGraphEngine`: the checkpoint's model on a CUDA GPU, built for throughput and small-batch latency.

- precision: ``bf16`` / ``fp16`` autocast for the encoder and the decoder, the bottleneck in fp32
  (`vqdiff.torch_engine.TorchEngine`); ``fp32`` runs with TF32 off (the CPU reference's numbers).
- channels_last weights and activations (cuDNN's NHWC kernels).
- CUDA graphs: the encoder and the decoder are captured once per bucket (`engine_base.DEFAULT_BUCKETS`:
  1, 8, 64, 512 groups); a call runs full chunks of the largest bucket, then pads its rest to the
  next bucket up (`engine_base.bucket_chunks`); padded rows are computed and dropped (every row is
  independent in eval mode). One shared memory pool; cuDNN autotuned while capturing.
- pinned host buffers (two slots per direction) and three streams: host -> device copies of chunk
  k+1 and device -> host copies of chunk k-1 run while chunk k computes. Device staging buffers
  decouple the copies from the graphs' static inputs / outputs; events guard every reuse.

``graphs=False`` runs the same pipeline eagerly (no capture): the comparison point for the graphs.
Needs torch with CUDA; nothing here runs on the CPU (the tests are marked ``gpu``), except the
bucket arithmetic, which lives in `engine_base` and is tested everywhere.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .engine_base import DEFAULT_BUCKETS, BackendUnavailable, _GroupEngine, bucket_chunks, check_buckets

WARMUP_ITERS = 3  # eager runs on a side stream before each capture (cuDNN autotuning, lazy init)


def _tf32_off(torch):
    """cuDNN with TF32 off (fp32 convolutions as on the CPU), autotuning on; other flags unchanged."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=True, deterministic=b.deterministic, allow_tf32=False)


class _Runner:
    """One graph (encoder or decoder) at one bucket: static input, captured graph or eager fn, outputs."""

    def __init__(self, torch, fn, inp, pool, graphs: bool, device):
        self.torch, self.fn, self.inp = torch, fn, inp
        self.graph, self.outs = None, None
        if graphs:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_ITERS):
                    fn(inp)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outs = fn(inp)

    def run(self):
        """Outputs of the current input, on the current stream."""
        if self.graph is None:
            return self.fn(self.inp)
        self.graph.replay()
        return self.outs


class CudaGraphEngine(_GroupEngine):
    """The torch model on ``device`` with autocast, channels_last, CUDA graphs and overlapped copies."""

    backend = "torch"
    name = "torch-cuda"

    def __init__(self, checkpoint_dir: str | os.PathLike, *, device: str = "cuda:0", precision: str = "bf16",
                 channels_last: bool = True, buckets=None, graphs: bool = True,
                 expected_sha256: str | None = None, manifest: dict | None = None, layers: str = "all"):
        import torch

        from vqdiff.bottlenecks import uses_codebook
        from vqdiff.torch_engine import TorchEngine

        from .engine_base import load_checked

        if not torch.cuda.is_available():
            raise BackendUnavailable(f"the CUDA graph engine needs a CUDA GPU; torch sees none (device={device!r})")
        ckpt = load_checked(checkpoint_dir, expected_sha256, precision)
        self.buckets = check_buckets(buckets or DEFAULT_BUCKETS)
        super().__init__(normalisation=ckpt.normalisation, model_info=ckpt.model_info, manifest=manifest,
                         batch_size=self.buckets[-1])
        self.torch = torch
        self.device = torch.device(device if ":" in str(device) else f"{device}:0")
        self.precision, self.graphs, self.channels_last = precision, bool(graphs), bool(channels_last)
        self.inner = TorchEngine(ckpt.model, device=self.device, batch_size=self.buckets[-1], precision=precision,
                                 channels_last=channels_last, layers=layers)
        self.inner.autocast_cache = False  # casts cached by autocast must not outlive a capture
        self.has_indices = uses_codebook(ckpt.model.config.bottleneck)
        self.provider = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        self._lock = threading.Lock()
        with torch.cuda.device(self.device), torch.no_grad(), self._flags():
            self._setup()

    # ------------------------------------------------------------------ set-up
    def _flags(self):
        import contextlib

        return _tf32_off(self.torch) if self.precision == "fp32" else contextlib.nullcontext()

    def _encode_fn(self, x):
        out = self.inner.encode_batch(x)
        lat = out.latents.float().contiguous()
        return (lat,) if out.indices is None else (lat, out.indices)

    def _decode_fn(self, lat):
        return (self.inner.decode_batch(lat),)

    def _setup(self) -> None:
        torch, dev, top = self.torch, self.device, self.buckets[-1]
        probe = self._encode_fn(torch.zeros((1, 3, 64, 64), device=dev))
        self.latent_shape = tuple(probe[0].shape[1:])
        self.specs = {  # kind -> (input shape, [(output shape, torch dtype)])
            "enc": ((3, 64, 64), [(tuple(t.shape[1:]), t.dtype) for t in probe]),
            "dec": (self.latent_shape, [((3, 64, 64), torch.float32)]),
        }
        self.streams = {k: torch.cuda.Stream(dev) for k in ("h2d", "compute", "d2h")}
        self.events = {k: [torch.cuda.Event() for _ in range(2)] for k in ("in_done", "stage_free", "computed",
                                                                              "out_free")}
        self.host_in, self.host_out, self.dev_in, self.dev_out, self.runners = {}, {}, {}, {}, {}
        pool = torch.cuda.graph_pool_handle() if self.graphs else None
        fns = {"enc": self._encode_fn, "dec": self._decode_fn}
        for kind, (in_shape, outs) in self.specs.items():
            self.host_in[kind] = [torch.zeros((top, *in_shape), pin_memory=True) for _ in range(2)]
            self.host_out[kind] = [[torch.zeros((top, *s), dtype=d, pin_memory=True) for s, d in outs]
                                   for _ in range(2)]
            self.dev_in[kind] = [torch.zeros((top, *in_shape), device=dev) for _ in range(2)]
            self.dev_out[kind] = [[torch.zeros((top, *s), dtype=d, device=dev) for s, d in outs] for _ in range(2)]
            self.runners[kind] = {}
            for b in sorted(self.buckets, reverse=True):  # largest first: the pool then fits the rest
                inp = torch.zeros((b, *in_shape), device=dev)
                self.runners[kind][b] = _Runner(torch, fns[kind], inp, pool, self.graphs, dev)
        torch.cuda.synchronize(dev)

    # ------------------------------------------------------------------ the pipeline
    def _pipeline(self, kind: str, arr: np.ndarray) -> list[np.ndarray]:
        torch, ev, st = self.torch, self.events, self.streams
        in_shape, outs = self.specs[kind]
        if arr.shape[1:] != in_shape:
            raise ValueError(f"expected (B, {', '.join(map(str, in_shape))}), got {arr.shape}")
        n = len(arr)
        results = [np.empty((n, *s), dtype=torch.empty((), dtype=d).numpy().dtype) for s, d in outs]
        pending: list[tuple[int, int, int]] = []

        def collect(s, e, slot):
            ev["out_free"][slot].synchronize()  # its device -> host copies are done
            for res, host in zip(results, self.host_out[kind][slot], strict=True):
                res[s:e] = host[: e - s].numpy()

        for k, (s, e, b) in enumerate(bucket_chunks(n, self.buckets)):
            slot = k % 2
            ev["in_done"][slot].synchronize()  # the copy that last read this host slot (chunk k-2) is done
            host = self.host_in[kind][slot][:b].numpy()
            host[: e - s] = arr[s:e]
            host[e - s :] = 0.0
            stage = self.dev_in[kind][slot][:b]
            with torch.cuda.stream(st["h2d"]):
                st["h2d"].wait_event(ev["stage_free"][slot])
                stage.copy_(self.host_in[kind][slot][:b], non_blocking=True)
                ev["in_done"][slot].record(st["h2d"])
            runner = self.runners[kind][b]
            with torch.cuda.stream(st["compute"]):
                st["compute"].wait_event(ev["in_done"][slot])
                runner.inp.copy_(stage)
                ev["stage_free"][slot].record(st["compute"])
                produced = runner.run()
                st["compute"].wait_event(ev["out_free"][slot])
                for dst, src in zip(self.dev_out[kind][slot], produced, strict=True):
                    dst[:b].copy_(src)
                ev["computed"][slot].record(st["compute"])
            with torch.cuda.stream(st["d2h"]):
                st["d2h"].wait_event(ev["computed"][slot])
                for host_o, dev_o in zip(self.host_out[kind][slot], self.dev_out[kind][slot], strict=True):
                    host_o[:b].copy_(dev_o[:b], non_blocking=True)
                ev["out_free"][slot].record(st["d2h"])
            pending.append((s, e, slot))
            if len(pending) > 1:  # chunk k-1's copies back overlapped chunk k's compute
                collect(*pending.pop(0))
        for p in pending:
            collect(*p)
        return results

    def _run(self, kind: str, arr: np.ndarray) -> list[np.ndarray]:
        with self._lock, self.torch.cuda.device(self.device), self.torch.no_grad(), self._flags():
            return self._pipeline(kind, arr)

    # ------------------------------------------------------------------ the engine protocol
    def encode_with_indices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = self._check(x, 4, "groups (B, 3, 64, 64)")
        if not len(x):
            raise ValueError("no groups to encode")
        out = self._run("enc", x)
        return out[0], (out[1].astype(np.int64, copy=False) if len(out) > 1 else None)

    def decode_groups(self, latents: np.ndarray) -> np.ndarray:
        latents = self._check(latents, 4, "latents (B, D, 16, 16)")
        if not len(latents):
            raise ValueError("no latents to decode")
        return self._run("dec", latents)[0]

    def _run_encoder(self, x):
        return self.encode_with_indices(x)

    def _run_decoder(self, latents):
        return self.decode_groups(latents)
