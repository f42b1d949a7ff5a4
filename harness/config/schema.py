"""Typed configuration of a pretraining run.

Each component owns one dataclass here; a run is the tree under `RunConfig`.
Values are plain Python types so that YAML files, dotted command-line
overrides and the resolved config written beside every run round-trip
exactly. Cross-field rules (crop counts vs crops_for_assign, head input vs
trunk width, ...) live in `harness.config.validate`, not here, so that this
module stays a readable list of knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RegNetSpec:
    """The five numbers of the RegNet design space (Radosavovic et al. 2020) plus SE.

    Widths are quantized with the pycls/ClassyVision rule that SEER used,
    not torchvision's `_make_divisible` (see harness/models/regnet.py).
    """

    depth: int
    w0: int
    wa: float
    wm: float
    group_width: int
    se_ratio: Optional[float] = 0.25  # None: plain RegNetX-style block
    bottleneck_multiplier: float = 1.0
    stem_width: int = 32


@dataclass
class ModelConfig:
    """The trunk. `arch` names a zoo preset (`harness models` lists them);
    `arch: regnet` builds a custom RegNet from `regnet`."""

    arch: str = "regnety_800mf"
    regnet: Optional[RegNetSpec] = None


@dataclass
class CropConfig:
    """One resolution group of multi-crop views."""

    size: int = 224
    count: int = 2
    scale: list[float] = field(default_factory=lambda: [0.14, 1.0])


@dataclass
class AugmentConfig:
    """SwAV/SimCLR colour and blur augmentations (Caron et al. 2020)."""

    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    normalize_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalize_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class DataConfig:
    """Where images come from and how they become crops.

    `path: null` trains on the built-in photographs (no download needed).
    `batch_size` is images per rank per micro-step; the global batch is
    batch_size x world size x train.grad_accum.
    """

    path: Optional[str] = None
    # auto: from data.path (none: built-in photos; a folder, its index.harnidx, a .txt list, tar shards);
    # or one of builtin, folder, index, list, shards, synthetic (random crops: the model without the data path)
    source: str = "auto"
    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
    )
    batch_size: int = 16
    num_workers: int = 2
    prefetch_factor: int = 4  # batches each worker keeps ready
    shuffle_buffer: int = 1000  # tar shards: samples mixed within a shard while streaming it
    watch: bool = True  # tar shards: list the location again at each pass, so new shards join
    colour_on: str = "cpu"  # cpu | device: colour jitter, grayscale and blur batched on the accelerator
    crops: list[CropConfig] = field(
        default_factory=lambda: [
            CropConfig(size=224, count=2, scale=[0.14, 1.0]),
            CropConfig(size=96, count=4, scale=[0.05, 0.14]),
        ]
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SwAVConfig:
    """SwAV head, prototypes, Sinkhorn and loss (Caron et al. 2020; SEER 3.3)."""

    head_dims: list[int] = field(default_factory=lambda: [768, 2048, 2048, 128])  # regnety_800mf ends at 768
    head_batchnorm: bool = False  # SEER: no BN in the head; VISSL's SwAV base has it
    num_prototypes: list[int] = field(default_factory=lambda: [3000])
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    sinkhorn_fp64: bool = False  # fp64 without max-subtraction instead of fp32 with it
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    freeze_prototypes_iters: int = 313
    queue_length: int = 0  # per rank; 0 disables the queue
    queue_start_iter: int = 0
    # One trunk pass for all crops: the small ones zero-padded to the largest size, the padding cut
    # before pooling (VISSL's create_multidimensional_tensor, SEER-10B). SyncBN then sees the padding.
    single_pass_pad: bool = False


@dataclass
class LarsConfig:
    """Layer-wise adaptive rate scaling (You et al. 2017), as VISSL's LARC."""

    enabled: bool = True
    trust_coefficient: float = 0.001
    eps: float = 1e-8
    clip: bool = False
    exclude_bn_bias: bool = False  # VISSL adapted every parameter (vissl PR 230)


@dataclass
class OptimConfig:
    """SGD with momentum, optionally wrapped by LARS."""

    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-6
    lars: LarsConfig = field(default_factory=LarsConfig)


@dataclass
class ScheduleConfig:
    """Learning rate per optimizer step.

    `cosine`: linear warmup start_lr -> peak, then cosine to final_lr_ratio x peak.
    `plateau`: fixed peak LR, halved when the loss stops decreasing (SEER 3.3).
    `constant`: peak LR throughout.
    The peak is base_lr x global_batch / base_batch when scale_with_batch.
    The warmup lasts warmup_iters steps, or warmup_fraction of train.iterations when that is set
    (VISSL's composite `lengths`; then warmup_iters must be 0). interval_scaling (cosine only, VISSL's
    term): `rescaled` runs the cosine over the steps after the warmup, from the peak; `fixed` evaluates
    it at the fraction of the WHOLE run, as VISSL's SwAV configs do, so it starts just below the peak.
    """

    name: str = "cosine"
    base_lr: float = 0.3
    base_batch: int = 256
    scale_with_batch: bool = True
    start_lr: float = 0.3
    warmup_iters: int = 0
    warmup_fraction: Optional[float] = None  # of train.iterations, in [0, 1); null: warmup_iters counts
    interval_scaling: str = "rescaled"  # rescaled | fixed: the cosine's clock (see above)
    final_lr_ratio: float = 0.001
    plateau_factor: float = 0.5
    plateau_patience: int = 1000  # optimizer steps without improvement
    plateau_threshold: float = 1e-3  # relative improvement that counts
    plateau_window: int = 100  # steps averaged into one loss reading


@dataclass
class ParallelConfig:
    """How the model is spread over processes and which numerics it runs in.

    One section serves every backend; keys a backend does not use are
    ignored by it (and say so in their comment).
    """

    backend: str = "none"  # none | ddp | fsdp2 | deepspeed | fairscale
    precision: str = "fp32"  # fp32 | fp16 | bf16
    # NHWC trunk weights and crops on CUDA (backends none/ddp; the sharded ones keep NCHW):
    # cuDNN's tensor-core convolutions run NHWC, so NCHW costs a transpose per layer
    channels_last: bool = True
    syncbn_group_size: int = 0  # 0: global, -1: one node, N: groups of N ranks
    activation_checkpointing: bool = False
    stage_checkpoints: Optional[list[list[int]]] = None  # VISSL-style split points per stage; None: per block
    wrap_min_params: int = 100_000_000  # fairscale auto-wrap threshold (SEER-10B)
    # fairscale only (VISSL's FSDP_CONFIG keys): reduce-scatter gradients in fp32 under fp16/bf16
    # (False: in the compute dtype, as SEER-10B did), reduce-scatter bucket size (0: no bucketing),
    # and drop autocast's cast cache after each unit's forward (frees the fp16 weight copies)
    fp32_reduce_scatter: bool = True
    bucket_cap_mb: int = 25
    clear_autocast_cache: bool = False
    reshard_after_forward: bool = True  # fsdp2: True = ZeRO-3-like, False = ZeRO-2-like
    shard_group_size: int = 0  # fsdp2 hybrid: shard within groups of N ranks (a node), replicate across; 0: all ranks
    cpu_offload: bool = False  # fsdp2 CPUOffloadPolicy; deepspeed offload of optimizer state (and params at ZeRO-3)
    zero_stage: int = 2  # deepspeed: 1, 2 or 3
    allow_slow_cpu_fp16: bool = False  # fp16 on CPU is refused (11-13x slower than fp32); true runs it
    # anyway, for tests of the fp16 code paths (loss scaler, overflow skipping) on a CPU-only machine
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON (e.g. ds_configs/zero3_fp16.json); its zero stage
    # and precision must agree with this section, batch fields are filled from data/train


@dataclass
class TrainConfig:
    """Length of the run, seeding, logging and where results go."""

    iterations: int = 100
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 1
    checkpoint_every: int = 0  # steps between checkpoints; 0: none by step count
    checkpoint_minutes: float = 0.0  # minutes between checkpoints; 0: none by time
    checkpoint_keep: int = 3  # newest checkpoints kept (milestones are kept on top)
    checkpoint_milestones: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    checkpoint_async: bool = False  # DCP async_save: training goes on while the checkpoint is written
    resume: str = "auto"  # auto: continue this run_name's newest complete checkpoint | never | a checkpoint path
    init_from: Optional[str] = None  # start a NEW run from a checkpoint's weights (see init_from_scope)
    init_from_scope: str = "all"  # all: trunk, head and prototypes | trunk
    time_limit: float = 0.0  # minutes of wall clock after which the run checkpoints and exits 0; 0: none
    max_bad_steps: int = 5  # consecutive steps with a NaN/Inf loss or gradient before the run stops
    compile: bool = False  # torch.compile the trunk block by block (harness.parallel.compile): the first
    # steps pay for the compilation, later ones run fused kernels with less host work per step
    output_dir: str = "runs"
    run_name: Optional[str] = None
    # experiment trackers beside metrics.jsonl (always written): any of tensorboard, wandb, mlflow; [] for none.
    # Each works offline (harness/train/trackers.py)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    eval_every: int = 0  # steps between k-NN evaluations of the live trunk on eval.data (and after the last); 0: none


@dataclass
class KnnEvalConfig:
    """Weighted k-NN on L2-normalised pooled features (Wu et al. 2018, as DINO's eval_knn.py)."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class LinearEvalConfig:
    """BatchNorm + linear head on frozen, cached features (VISSL's linear benchmark), SGD with
    momentum; epochs and LR milestones as VISSL's 28-epoch ImageNet schedule (decays at 8/16/24),
    so a small set gets the same schedule shape."""

    taps: list[str] = field(default_factory=lambda: ["pool"])  # any of res4, res5, pool
    epochs: int = 28
    milestones: list[float] = field(default_factory=lambda: [8 / 28, 16 / 28, 24 / 28])  # fractions of training
    batch_size: int = 256
    base_lr: float = 0.01  # per 256 images
    momentum: float = 0.9
    nesterov: bool = True
    weight_decays: list[float] = field(default_factory=lambda: [5e-4])  # one head per value, best reported
    batchnorm: bool = True


@dataclass
class FinetuneEvalConfig:
    """Full fine-tuning as the paper (4.1): SGD momentum 0.9, batch 256, LR 0.0125 (per 256 images),
    x0.1 after 30 of 35 epochs, weight decay 1e-4, SwAV's augmentation; top-1 on centre crops."""

    epochs: int = 35
    decay_at: list[float] = field(default_factory=lambda: [30 / 35])  # fractions of training
    batch_size: int = 256  # global
    base_lr: float = 0.0125
    momentum: float = 0.9
    weight_decay: float = 1e-4
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop, as SwAV's eval_semisup


@dataclass
class EvalConfig:
    """Evaluation of a trunk on a labelled set (`harness eval`, and `train.eval_every`).

    `data: null` uses the built-in labelled set named by `builtin`
    (generated once into the output folder): `scenes` (10 object shapes,
    64 px) or `textures` (8 surface patterns, 32 px); otherwise a folder with
    `train/` and `val/` in ImageFolder layout (one sub-folder per class).
    Images are resized to `resize` (shorter side) and centre-cropped to
    `crop`, VISSL's 256/224."""

    data: Optional[str] = None
    builtin: str = "scenes"  # scenes | textures: the generated set used when data is null
    crop: int = 224
    resize: int = 256
    batch_size: int = 64  # per rank, feature extraction
    num_workers: int = 2
    subset: Optional[str] = None  # low-shot training subset: 1%, 10%, 0.05, 5/class; null: all
    seed: int = 0
    # knn/linear: BatchNorm running statistics recomputed on the train images first (a random-init trunk's are
    # 0/1, so its baseline is otherwise handicapped; also for a trunk moved to other data)
    recompute_bn: bool = False
    knn: KnnEvalConfig = field(default_factory=KnnEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    finetune: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)


@dataclass
class RunConfig:
    """A whole pretraining run. `world_size` is what the preset was designed
    for (SEER: 512); it only documents the recipe and feeds the planner, the
    launcher decides the real one."""

    name: str = "custom"
    description: str = ""
    world_size: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
