"""The training loop: single process or torchrun DDP, CPU (bf16 autocast) or CUDA (AMP).

Outputs in ``out_dir``: ``last/`` and ``best/`` checkpoints (``model.safetensors`` +
``config.json``; ``last/`` also ``train_state.pt`` for exact resume: optimizer, scheduler,
step, RNG states, wall time), and ``log.jsonl`` (one line per log / validation event).

Splits: training groups come from the dataset's training split only; the validation split selects
``best/`` (lowest validation mean MDF) and stops early with ``patience``; the test split
(`BundleData.test_groups`) is never read here. ``init_from`` (fine-tuning) starts from another
checkpoint's weights and adopts its architecture and normalisation (no refit); it is recorded as
``training.init_from`` (path, model id, weights sha256, kind) in every checkpoint written.
Augmentations (`vqdiff.training.augment`, all off by default) are applied by the group sampler.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqdiff.bottlenecks import bottleneck_config_from_dict, bottleneck_config_to_dict
from vqdiff.checkpoint import load_checkpoint, save_checkpoint
from vqdiff.codec import TEMPLATES_FILE
from vqdiff.errors import CheckpointError
from vqdiff.fileio import recover_replaced_dir
from vqdiff.geometry import groups_to_model
from vqdiff.models import ModelConfig, StreamlineAutoencoder
from vqdiff.normalise import Normalisation
from vqdiff.templates import Templates

from .augment import Augmentation
from .data import GroupSampler, load_dataset
from .evaluate import validate

log = logging.getLogger(__name__)
STATE = "train_state.pt"


def training_templates(bundles) -> Templates:
    """Registration templates of the training streamlines (model space), one per bundle name."""
    by_name: dict[str, list] = {}
    for b in bundles:
        if len(b.train):
            by_name.setdefault(b.bundle, []).append(b.train)
    return Templates.from_bundles({name: list(np.concatenate(parts)) for name, parts in sorted(by_name.items())})


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "vq_diff"
    bottleneck: dict = field(default_factory=dict)  # per-kind overrides, e.g. {"tau": 10}
    model: dict = field(default_factory=dict)  # ModelConfig overrides, e.g. {"hidden": 128}
    steps: int = 6000
    batch_size: int = 32
    lr: float = 2e-3
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 (CPU autocast / CUDA AMP)
    channels_last: bool = True
    compile: bool = False
    balance: bool = False
    max_extra: int = 32
    # augmentations (vqdiff.training.augment; all off by default)
    rotate_deg: float = 0.0  # uniform in +- this about each axis (<= vqdiff.slr.ROTATION_DEG)
    translate_mm: float = 0.0  # uniform in +- this per axis (<= vqdiff.slr.TRANSLATION_MM)
    scale_range: tuple[float, float] = (1.0, 1.0)  # isotropic scale, log-uniform (within vqdiff.slr.SCALE_RANGE)
    aniso_scale: float = 0.0  # per-axis scale exp(U(+-this))
    shear: float = 0.0  # upper off-diagonal terms U(+-this)
    mirror_prob: float = 0.0  # x -> 2 cx - x about the subject's mid-sagittal plane, with this probability
    mirror_x: float | None = None  # that plane's x (default: from each subject's left/right bundle pairs)
    elastic_mm: float = 0.0  # smooth displacement field, |u| <= this
    elastic_wavelength_mm: float = 80.0  # shortest wavelength of the field
    jitter_mm: float = 0.0  # Gaussian noise per point (std)
    eval_every: int = 250
    patience: int = 0  # stop after this many validations without a better validation MDF (0: never)
    seed: int = 0
    time_limit_s: float | None = None  # stop (and checkpoint) after this much wall time in this run
    init_from: str | None = None  # fine-tune: a checkpoint directory whose weights, architecture, normalisation start the run

    def __post_init__(self):
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))

    def model_config(self) -> ModelConfig:
        return ModelConfig.for_kind(self.kind, bottleneck=self.bottleneck, **self.model)

    def augmentation(self) -> Augmentation:
        return Augmentation.from_config(self)


def init_model_config(cfg: TrainConfig, init) -> ModelConfig:
    """The architecture of a fine-tuning run: ``init``'s (a `Checkpoint`), with ``cfg.bottleneck``'s
    training options (tau, commitment cost, ...) on top; a different kind or ``cfg.model`` is refused."""
    path = cfg.init_from
    if init.model.kind != cfg.kind:
        raise CheckpointError(f"--init-from {path} is a {init.model.kind!r} model but --kind is {cfg.kind!r}; "
                              "leave --kind out to adopt the checkpoint's kind")
    if cfg.model:
        raise CheckpointError(f"--model {cfg.model} cannot change the architecture of --init-from {path}: "
                              "a fine-tuning run adopts it")
    mc = init.model.config
    if cfg.bottleneck:
        try:
            b = bottleneck_config_from_dict({**bottleneck_config_to_dict(mc.bottleneck), **cfg.bottleneck})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"--bottleneck {cfg.bottleneck}: {e}") from e
        mc = ModelConfig.from_dict({**mc.to_dict(), "bottleneck": bottleneck_config_to_dict(b)})
    return mc


SCHEDULES = ("onecycle", "cosine", "constant")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then the schedule's decay."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; select one of {SCHEDULES}")
    warm = max(1, int(cfg.warmup_fraction * cfg.steps))
    if cfg.schedule == "constant":
        return min(1.0, (step + 1) / warm)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    floor = 0.01 if cfg.schedule == "onecycle" else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; select one of ['auto', 'fp32', 'bf16']")


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, device: str | None = None,
                 resume: bool = True, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world = _distributed()
        if device is None:
            device = f"cuda:{self.rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.progress = progress and self.rank == 0
        self.manifest, bundles = load_dataset(data_dir)
        # validation groups select the model; the test groups (b.test_groups) are never read in training
        self.val_groups = np.concatenate([b.val_groups for b in bundles]) if bundles else np.zeros((0,))
        self.val_labels = np.concatenate([[b.label] * len(b.val_groups) for b in bundles]).astype(int)
        train_points = np.concatenate([b.train for b in bundles if len(b.train)])
        torch.manual_seed(cfg.seed)
        self.init_info = None
        if cfg.init_from:  # fine-tuning: the checkpoint's weights, architecture and normalisation
            init = load_checkpoint(cfg.init_from)
            self.model = StreamlineAutoencoder.from_config(init_model_config(cfg, init))
            try:
                self.model.load_state_dict(init.model.state_dict())
            except RuntimeError as e:
                raise CheckpointError(f"--bottleneck {cfg.bottleneck} changes the shape of --init-from's weights: {e}") from e
            self.model.to(self.device)
            self.norm = init.normalisation
            self.init_info = {"path": str(cfg.init_from), "model_id": init.model_id, "sha256": init.model_hash,
                              "kind": init.model.kind}
            far = self.norm.out_of_range(train_points)
            if far:
                log.warning("the training data leaves the range of --init-from's normalisation: %s", far)
        else:
            self.model = StreamlineAutoencoder.from_config(cfg.model_config()).to(self.device)
            self.norm = Normalisation.fit(train_points)
        self.sampler = GroupSampler(bundles, balance=cfg.balance or self.manifest.get("balance", False),
                                    max_extra=cfg.max_extra, augment=cfg.augmentation(), mirror_x=cfg.mirror_x,
                                    seed=cfg.seed + 1000 * self.rank)
        self.templates = training_templates(bundles).to_bytes() if self.rank == 0 else b""
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.step, self.wall, self.best, self.stale = 0, 0.0, math.inf, 0
        if resume:
            recover_replaced_dir(self.out / "last", STATE)
        if resume and (self.out / "last" / STATE).is_file():
            self._load_state()
        elif resume and any((self.out / d).exists() for d in ("last", "best")):
            raise CheckpointError(
                f"{self.out} has checkpoints but no resumable state ({self.out / 'last' / STATE} is missing); "
                "starting from step 0 would overwrite them: pass --fresh (resume=False) to do that on purpose, "
                "or give another OUT_DIR")
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        if cfg.compile:
            self.net = torch.compile(self.net)

    # ------------------------------------------------------------------ state
    def _extra(self, metrics: dict | None = None) -> dict:
        return {
            "training": {**asdict(self.cfg), "init_from": self.init_info, "steps_done": self.step,
                         "wall_time_s": round(self.wall, 1), "world_size": self.world, "device": str(self.device),
                         "torch": torch.__version__, "selection_split": "validation",
                         **({"mirror_planes_x": self.sampler.mirror_planes} if self.sampler.mirror_planes else {})},
            "data_manifest_sha256": self.manifest.get("sha256"),
            "data_split": {k: self.manifest.get(k) for k in ("split_by", "val_fraction", "test_fraction", "seed")},
            "bundles": self.manifest.get("bundles"),
            "metrics": metrics or {},
        }

    def _rank_state(self) -> dict:
        """This process's random state: torch (CPU and, when used, CUDA) and the group sampler."""
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "sampler_rng": json.dumps(self.sampler.state())}

    def _gather_rank_states(self) -> list[dict]:
        """Every rank's random state, in rank order (a collective: every rank calls it at the same step)."""
        mine = self._rank_state()
        if self.world == 1:
            return [mine]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, mine)
        return out

    def _agree(self, flag: bool) -> bool:
        """One decision for all ranks (any rank's True wins), so that collectives never desynchronise."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def save(self, metrics: dict | None = None, *, best: bool = False, ranks: list[dict] | None = None) -> None:
        if self.rank != 0:
            return
        name = "best" if best else "last"
        files = {TEMPLATES_FILE: self.templates}
        if not best:  # the resume state is written inside the same atomic swap as the weights
            ranks = ranks or [self._rank_state()]
            state = {
                "step": self.step, "wall": self.wall, "best": self.best, "stale": self.stale,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "torch_rng": ranks[0]["torch_rng"], "sampler_rng": ranks[0]["sampler_rng"],
                "ranks": ranks, "world_size": self.world,
            }
            buf = io.BytesIO()
            torch.save(state, buf)
            files[STATE] = buf.getvalue()
        save_checkpoint(self.out / name, self.model, self.norm, model_id=f"{self.cfg.kind}-{self.out.name}",
                        extra=self._extra(metrics), files=files, overwrite=True)

    def _load_state(self) -> None:
        ck = load_checkpoint(self.out / "last", device=self.device)
        saved = ck.info.get("training", {}).get("init_from")
        if (saved or {}).get("sha256") != (self.init_info or {}).get("sha256"):
            was = f"fine-tuned from {saved['path']} (weights {saved['sha256'][:12]})" if saved else "trained from scratch"
            now = (f"--init-from {self.init_info['path']} (weights {self.init_info['sha256'][:12]})" if self.init_info
                   else "no --init-from")
            raise CheckpointError(f"{self.out / 'last'} was {was}; resuming it with {now} would mix two runs: "
                                  "give the same --init-from, or --fresh, or another OUT_DIR")
        self.model.load_state_dict(ck.model.state_dict())
        self.norm = ck.normalisation
        state = torch.load(self.out / "last" / STATE, map_location="cpu", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ranks = state.get("ranks") or [{"torch_rng": state["torch_rng"], "sampler_rng": state["sampler_rng"]}]
        if len(ranks) != self.world:
            log.warning("the run was saved with %d process(es) and resumes with %d: random streams are re-seeded "
                        "per rank from rank 0's, so the resumed run is not the one an uninterrupted run would give",
                        len(ranks), self.world)
        mine = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        torch.set_rng_state(mine["torch_rng"])
        if mine.get("cuda_rng") and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        self.sampler.set_state(json.loads(mine["sampler_rng"]))
        self.step, self.wall, self.best = int(state["step"]), float(state["wall"]), float(state["best"])
        self.stale = int(state.get("stale", 0))
        log.info("resumed from %s at step %d (%.0f s trained)", self.out / "last", self.step, self.wall)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ loop
    def train_step(self, batch_mm: np.ndarray) -> dict:
        x = torch.from_numpy(groups_to_model(self.norm.apply(batch_mm))).to(self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.cfg.precision):
            out = self.net(x)
            recon = F.mse_loss(out.reconstruction.float(), x)
            loss = recon + out.bottleneck.loss.float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        rec = {"loss": loss.item(), "mse": recon.item()}
        if out.bottleneck.perplexity is not None:
            rec["perplexity"] = out.bottleneck.perplexity.item()
        return rec

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc=f"train {cfg.kind}",
                   dynamic_ncols=True)
        started = time.perf_counter()
        wall0 = self.wall
        metrics: dict = {}
        stopped_early, stop_reason = False, None
        while self.step < cfg.steps:
            if cfg.patience and self.stale >= cfg.patience:  # (a resumed run that had stopped early)
                stopped_early, stop_reason = True, "patience"
                break
            rec = self.train_step(self.sampler.sample(cfg.batch_size))
            self.step += 1
            self.wall = wall0 + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items()})
            if self.step % 50 == 0:
                self._log({"step": self.step, "wall_s": round(self.wall, 1), "lr": self.sched.get_last_lr()[0], **rec})
            last = self.step == cfg.steps
            out_of_time = cfg.time_limit_s is not None and self._agree(time.perf_counter() - started > cfg.time_limit_s)
            if self.step % cfg.eval_every == 0 or last or out_of_time:
                metrics = self.evaluate_and_save()
                if cfg.patience and not last and self._agree(self.stale >= cfg.patience):
                    stopped_early, stop_reason = True, "patience"
                    log.info("no better validation MDF in %d validations: stopping at step %d", self.stale, self.step)
                    break
            if out_of_time and not last:
                stopped_early, stop_reason = True, "time_limit"
                break
        bar.close()
        if self.world > 1:
            torch.distributed.barrier()
        return {"step": self.step, "wall_time_s": self.wall, "stopped_early": stopped_early,
                "stop_reason": stop_reason, "selection_split": "validation", **metrics}

    def evaluate_and_save(self) -> dict:
        metrics = {}
        ranks = self._gather_rank_states()  # every rank's random state goes into last/
        if self.rank == 0:
            metrics = validate(self.model, self.norm, self.val_groups, self.device)
            metrics["train_wall_s"] = round(self.wall, 1)
            metrics["step"] = self.step
            self._log({"step": self.step, "wall_s": round(self.wall, 1), **metrics})
            log.info("step %d: %s", self.step, {k: round(v, 5) for k, v in metrics.items()})
            score = metrics.get("val_mdf", math.inf)
            if score < self.best:
                self.best, self.stale = score, 0
                self.save(metrics, best=True)
            elif math.isfinite(score):  # (no validation groups: nothing to be patient about)
                self.stale += 1
            self.save(metrics, ranks=ranks)
        if self.world > 1:
            torch.distributed.barrier()
        return metrics
