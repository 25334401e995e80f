"""The SPOT reference code's training and evaluation steps, transcribed op for op (written from
reading the reference repository, not copied): what `spot-fast bench`'s reference rows time.

    model.py   SPOT, slot attention, the one-order-at-a-time decoder with explicit masked attention
    vit.py     DINO's ViT (explicit q @ k^T + softmax), loading timm's weights
    data.py    the COCO dataset as the reference reads it (JPEG + every annotation mask), its loader
    metrics.py the evaluation's metrics as the reference computes them (one-hot, per-image loops)
    steps.py   one step of stage 1, stage 2 and evaluation, as the reference's scripts run them
    worker.py  a process that runs those steps, or a reference checkout's own code, on request
"""
