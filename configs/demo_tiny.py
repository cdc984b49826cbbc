"""The CPU recipe of the embedded default: a tiny ViT ("demo/4", 28x28), minutes on 2 cores.

Same loop and fields as configs/paper_vit_b16.py; only the scale and the numbers differ.
At this size 3-bit PTQ barely hurts, so the demo quantizes to 2 bits (SMALL_SCALE.md).

    qvec finetune --config configs/demo_tiny.py --task digits --mode qat --workdir runs/d_qat
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "digits"
    c.mode = "fp"
    c.seed = 2038

    c.model = ml_collections.ConfigDict()
    c.model.variant = "demo/4"
    c.model.image_size = 28

    # "random" trains from scratch; kind="pretrained" with path= a backbone written by
    # checkpoints.save_params (the demo pretrains one) fine-tunes like the paper.
    c.init = ml_collections.ConfigDict()
    c.init.kind = "random"
    c.init.path = ""

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""

    c.quant = ml_collections.ConfigDict()
    c.quant.bits = 2
    c.quant.granularity = "channel"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 20
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.label_smoothing = 0.0

    c.batch_size = 64
    c.device_batch_size = 0
    c.epochs = -1.0
    c.total_steps = 300

    c.eval_batch_size = 512
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.log_every = 10
    c.fsdp = False
    return c
