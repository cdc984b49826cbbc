"""The paper's recipe (METHOD.md): ViT-B/16 in21k, AdamW, warmup + cosine, 3-bit QAT.

    qvec finetune --config configs/paper_vit_b16.py --task cifar10 --mode qat \
        --workdir runs/cifar10_qat init.path=/path/to/ViT-B_16.npz

FP and QAT differ only in ``mode``; everything else, the seed included, is shared so
that ``QAT - FP`` isolates the effect of quantization-aware training.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = ""  # set by --task; epochs come from the task table unless overridden
    c.mode = "fp"  # "fp" or "qat" (set by --mode)
    c.seed = 2038  # head init and data order; identical for FP and QAT

    c.model = ml_collections.ConfigDict()
    c.model.variant = "B/16"
    c.model.image_size = 224
    # "bfloat16": the ViT computes in bf16 (train and eval); params, optimizer state,
    # fake-quant, the QV and PTQ stay float32.
    c.model.compute_dtype = "float32"

    # Google's original ViT-B/16 ImageNet-21k checkpoint (timm: vit_base_patch16_224.orig_in21k),
    # gs://vit_models/imagenet21k/ViT-B_16.npz. kind: "pretrained" (anything
    # pretrained.load_pretrained reads: .npz, safetensors, our params dir) or "random".
    # The classification head is always a fresh one for the task, seeded by `seed`.
    c.init = ml_collections.ConfigDict()
    c.init.kind = "pretrained"
    c.init.path = "ViT-B_16.npz"

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # "" = the data package's default location
    c.data.workers = 8  # grain worker processes for the training input (0: in-process),
    # used only when the split does not live on the devices (see device_bytes)
    # A training split whose uint8 images fit this many bytes a device lives on the
    # devices, and each step gathers its batch there (0: always stream from the host).
    c.data.device_bytes = 1 << 30

    c.quant = ml_collections.ConfigDict()
    c.quant.bits = 3
    c.quant.granularity = "channel"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.head_lr_mult = 1.0  # the head learns at lr * head_lr_mult; the paper: 1
    c.optim.weight_decay = 0.1  # on all params, as the authors did
    c.optim.warmup_steps = 500
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.label_smoothing = 0.0

    c.batch_size = 128  # effective (global) batch per optimizer step
    # Largest per-device micro-batch; when batch_size / num_devices is larger, the step
    # accumulates gradients over micro-batches (same update, less memory). 0 = no limit.
    # 32 fits a 16 GB GPU; on an H100/H200 (80-141 GB) use device_batch_size=0: a whole
    # batch of 128 needs about 12 GB there (bf16), and 4 micro-batches cost about 3.5x
    # the kernel launches of one (compiled for an H200, bench/gpu_check.py's notes).
    c.device_batch_size = 32
    c.epochs = -1.0  # -1 = the task table's epochs (METHOD.md)
    c.total_steps = -1  # > 0 overrides epochs

    c.eval_batch_size = 256
    c.checkpoint_every = 500  # optimizer steps between resumable checkpoints
    c.keep_checkpoints = 2
    # Optimizer steps per jitted call (a lax.scan; cut at records and checkpoints; 0 =
    # log_every). Bit-identical to one step a call; only the speed changes.
    c.steps_per_dispatch = 0
    c.log_every = 50
    c.fsdp = False  # True: shard params/opt state over the data axis (ZeRO-3 style)
    return c
