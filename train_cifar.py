"""Train a ViT with any attention-dropout mode on CIFAR-10/100 or synthetic data; run the paper's evaluations.

Li et al., "DropKey for Vision Transformer", CVPR 2023, Sec. 4.1: Tables 1-4 and Figs. 4-5 (README, "Train").
Reading order: data -> model, optimizer, lr schedule -> one training epoch -> the paper's evaluations -> the run
folder (one checkpoint per epoch is the commit) -> the CIFAR files -> --summarize -> command line.
"""
import argparse
import contextlib
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dropkey
from vit import ViT, cls_attention_entropy

fcntl = __import__("fcntl") if os.name == "posix" else None  # elsewhere (Windows) run folders are not locked
_reconstruct = np.zeros(0).__reduce__()[0]  # numpy's array rebuilder, which the CIFAR pickles name


# ----------------------------------------------------------------------------- data

CIFAR = {  # the official python tarballs, their md5 and per-channel statistics
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key=b"labels",
                    classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python", train=["train"],
                     test=["test"], label_key=b"fine_labels", classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))}
SYNTHETIC = dict(train=10000, test=2000, classes=10,  # mean and std measured on the seed-0 train split
                 mean=(0.4130, 0.4115, 0.4118), std=(0.2333, 0.2339, 0.2332))


class DataError(Exception):
    """A problem with the data, the run folder or training; main prints it as one line, without a traceback."""


def load_data(cfg, device):
    """Both splits as uint8 images and int64 labels on `device`, plus the per-channel mean and std."""
    spec = SYNTHETIC if cfg.dataset == "synthetic" else CIFAR[cfg.dataset]
    data, limit = {}, dict(train=cfg.limit_train, test=cfg.limit_test)
    for s in ("train", "test"):
        if cfg.dataset == "synthetic":
            x, y = synthetic(min(limit[s] or spec[s], spec[s]), cfg.seed, s)
        else:
            folder = ensure_cifar(spec, cfg.data_dir)  # downloaded and checked where missing (see below)
            x, y = map(torch.cat, zip(*[read_batch(os.path.join(folder, name), spec) for name in spec[s]]))
        data[s] = (x[:limit[s]].to(device), y[:limit[s]].to(device))
    if getattr(cfg, "label_noise", 0.0):  # training labels only: the test split stays clean
        data["train"] = (data["train"][0], noisy_labels(data["train"][1], cfg.label_noise, spec["classes"], cfg.seed))
    return dict(data, **{k: torch.tensor(spec[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std")})


def synthetic(n, seed, split="train", chunk=1000):
    """`n` images (n, 3, 32, 32) uint8, labels 0..9: a bright disc on a dark, noisy ground, textured by its class
    (stripes at 0, +-30, +-60, 90 degrees or a plaid, period 5 or 10 px); chunk c has its own seed (prefix-stable)."""
    images, labels = [], []
    y, x = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")  # (32, 32)
    for c in range(math.ceil(n / chunk)):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, split == "test", c]).generate_state(1)[0]))
        uniform = lambda low, high, *shape: low + (high - low) * torch.rand(chunk, *shape, generator=g)
        label = torch.randint(0, 10, (chunk,), generator=g)
        kind, sign = (label % 5).view(chunk, 1, 1), torch.randint(0, 2, (chunk, 1, 1), generator=g) * 2 - 1
        angle = sign * kind.clamp(max=3) * math.pi / 6                      # (chunk, 1, 1); kind 4: plaid
        freq = 2 * math.pi / torch.where(label < 5, 5.0, 10.0).view(chunk, 1, 1)
        phase = uniform(0, 2 * math.pi, 1, 1)
        wave = torch.cos(freq * (x * angle.cos() + y * angle.sin()) + phase)  # (chunk, 32, 32) stripes
        plaid = kind.view(-1) == 4
        f, ph = freq[plaid], phase[plaid]
        wave[plaid] = 0.5 * (torch.cos(f * x + ph) + torch.cos(f * y + 1.7 * ph))  # vertical + horizontal
        radius, cy, cx = uniform(11, 16, 1, 1), uniform(8, 24, 1, 1), uniform(8, 24, 1, 1)
        disc = ((y - cy) ** 2 + (x - cx) ** 2 < radius ** 2).float()        # (chunk, 32, 32)
        mix = (disc * (0.25 + 0.75 * (0.5 + 0.5 * wave))).unsqueeze(1)      # (chunk, 1, 32, 32); texture in [0, 1]
        fg, bg = uniform(0.5, 1.0, 3, 1, 1), uniform(0.0, 0.5, 3, 1, 1)      # (chunk, 3, 1, 1)
        image = bg + (fg - bg) * mix + 0.08 * torch.randn(chunk, 3, 32, 32, generator=g)
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(label)
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def noisy_labels(labels, fraction, classes, seed):
    """A copy of `labels`, round(fraction * n) of them moved to another class: labels only memorisation learns."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 2]).generate_state(1)[0]))
    changed = torch.randperm(len(labels), generator=g)[:round(fraction * len(labels))]
    shift = torch.randint(1, classes, (len(changed),), generator=g)     # never 0: the class always changes
    noisy = labels.cpu().clone()
    noisy[changed] = (noisy[changed] + shift) % classes
    return noisy.to(labels.device)


def augment(images, generator):
    """Random crop with 4-pixel zero padding and a random horizontal flip of a whole uint8 batch, on its device."""
    (B, C, H, W), device = images.shape, images.device
    padded = F.pad(images, (4, 4, 4, 4))                                    # (B, C, H + 8, W + 8)
    dy, dx = torch.randint(0, 9, (2, B, 1), device=device, generator=generator)
    flip = torch.rand(B, 1, device=device, generator=generator) < 0.5
    rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
    rows = (dy + rows).view(B, 1, H, 1)                                     # (B, 1, H, 1)
    cols = (dx + torch.where(flip, W - 1 - cols, cols)).view(B, 1, 1, W)    # (B, 1, 1, W); reversed = flipped
    return padded[torch.arange(B, device=device).view(B, 1, 1, 1),
                  torch.arange(C, device=device).view(1, C, 1, 1), rows, cols]  # (B, C, H, W)


# ----------------------------------------------------------------------------- model, optimizer, lr schedule

def build_model(cfg):
    """The ViT of `cfg`, its weights drawn from --seed."""
    torch.manual_seed(cfg.seed)
    classes = (SYNTHETIC if cfg.dataset == "synthetic" else CIFAR[cfg.dataset])["classes"]
    return ViT(image_size=32, patch_size=cfg.patch_size, num_classes=classes, dim=cfg.dim, depth=cfg.depth,
               heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, attn_drop_mode=cfg.mode, drop_ratio=cfg.drop_ratio,
               schedule=cfg.schedule, block_size=cfg.block_size)


def build_optimizer(model, cfg):
    """AdamW with weight decay on tensors of >= 2 dims (matrices, embeddings), not on biases and norms."""
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)


def forward(model, images, data, **kwargs):
    """The model on uint8 `images` normalised by the dataset's mean and std, in bfloat16 autocast on CUDA."""
    x = (images.float() / 255 - data["mean"]) / data["std"]                  # (B, 3, 32, 32)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        return model(x, **kwargs)


def get_lr(step, cfg, steps_per_epoch):
    """Linear warm-up, cosine decay to 0 at the end of --epochs, then the constant fine-tune lr (Sec. 4.1)."""
    warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    if step >= total:
        return cfg.finetune_lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- one training epoch

PROGRESS_EVERY = 20  # steps between two reads of the running loss and accuracy by the progress bar


def train_one_epoch(model, optimizer, data, cfg, epoch, generator, progress):
    """One pass over the shuffled training split; returns its statistics. No step waits for the device: losses
    and correct counts stay in tensors, read by the progress bar every PROGRESS_EVERY steps."""
    model.train()
    (images, labels), bs, start = data["train"], cfg.batch_size, time.perf_counter()
    n, steps = len(images), math.ceil(len(images) / cfg.batch_size)
    order = torch.randperm(n, device=images.device, generator=generator)
    losses, sums = torch.zeros(steps, device=images.device), torch.zeros(2, device=images.device)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for i in bar:
        idx = order[i * bs:(i + 1) * bs]
        lr = get_lr(epoch * steps + i, cfg, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits, y = forward(model, augment(images[idx], generator), data).float(), labels[idx]  # (B, classes), (B,)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[i] = loss.detach()
        sums += torch.stack([loss.detach() * len(idx), (logits.argmax(1) == y).sum()])  # loss * images, correct
        if progress and ((i + 1) % PROGRESS_EVERY == 0 or i + 1 == steps):
            seen, (loss_sum, correct), seconds = min(n, (i + 1) * bs), sums.tolist(), time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / seconds:.0f}")
    # a non-finite loss or weight stops the run before this epoch's commit: the last finite checkpoint stays
    finite = torch.cat([torch.isfinite(losses), torch.stack([torch.isfinite(p).all() for p in model.parameters()])])
    if not finite.all():
        i = int((~finite).nonzero()[0])                                     # i >= steps: a weight, after the last step
        what = f"the loss is {losses[i].item()}" if i < steps else "its update made a weight non-finite"
        kept = f"{cfg.out} keeps the checkpoint of epoch {epoch}, the last finite one" if epoch else \
            "no checkpoint was written"
        flag, rate = ("--lr", cfg.lr) if epoch < cfg.epochs else ("--finetune-lr", cfg.finetune_lr)
        raise DataError(f"training diverged in epoch {epoch + 1}, step {min(i + 1, steps)} of {steps}: {what}; "
                        f"{kept}; try a smaller {flag} (this run: {rate:g})")
    (loss_sum, correct), seconds = sums.tolist(), time.perf_counter() - start
    return dict(lr=lr, train_loss=loss_sum / n, train_acc=correct / n, images=n, time_s=seconds,
                images_per_s=n / seconds)


# ----------------------------------------------------------------------------- the paper's evaluations

@torch.no_grad()
def evaluate(model, data, cfg, split="test", drop_patches=0.0, entropy=False):
    """[loss, accuracy] on a split in eval mode (attention dropout only in an alignment), means over images; with
    `entropy`, then per layer the class token's attention entropy -sum_j p_j log p_j over its N keys (Fig. 4)."""
    images, labels = data[split]
    sums = torch.zeros(2 + entropy * len(model.blocks), device=images.device)  # loss, correct, entropy per layer
    for x, y in zip(images.split(cfg.batch_size), labels.split(cfg.batch_size)):
        out = forward(model.eval(), x, data, return_attention=entropy, drop_patches=drop_patches)
        logits, attention = (out[0].float(), out[1]) if entropy else (out.float(), [])  # (B, classes), per layer
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                             *[cls_attention_entropy(w).sum() for w in attention]])
    return [s / len(images) for s in sums.tolist()]


@torch.no_grad()
def save_attention_map(model, data, path, count=4):
    """Fig. 5: test images above the last layer's class-token attention on the patch grid, mean over heads."""
    from matplotlib.figure import Figure                                    # without pyplot: no backend, no window
    images = data["test"][0][:count]
    _, attention = forward(model.eval(), images, data, return_attention=True)
    maps = attention[-1][:, :, 0, 1:].float().mean(1).reshape(len(images), *model.grid)  # (count, n_h, n_w)
    fig = Figure(figsize=(2 * len(images), 4.2))
    axes = fig.subplots(2, len(images), squeeze=False, subplot_kw=dict(xticks=[], yticks=[], frame_on=False))
    for i in range(len(images)):
        axes[0, i].imshow(images[i].permute(1, 2, 0).cpu().numpy())
        axes[1, i].imshow(maps[i].cpu().numpy(), cmap="viridis")
    axes[1, 0].set_title("class-token attention, last layer", fontsize=8, loc="left")
    fig.savefig(png := io.BytesIO(), format="png", dpi=100)
    atomic_save(path, png.getvalue())


def paper_evaluations(model, data, cfg, plain_seconds):
    """The paper's analyses of the model as trained, before any fine-tune: Table 4, Fig. 4, Table 3, Fig. 5."""
    results, seconds = {}, {"plain": plain_seconds}
    alignments = [("mc", cfg.mc_samples, "none")] if cfg.mc_samples else []
    alignments += [("exact", 0, "exact")] if cfg.align == "exact" else []
    for key, mc_samples, align in alignments:  # accuracy and cost of each alignment (Table 4)
        start, model.mc_samples, model.align = time.perf_counter(), mc_samples, align
        results[f"test_acc_{key}"] = evaluate(model, data, cfg)[1]
        seconds[key] = time.perf_counter() - start
    model.mc_samples, model.align = 0, "none"
    results.update(eval_time_s=seconds, cls_attention_entropy=evaluate(model, data, cfg, entropy=True)[2:])
    # train_acc_eval - test_acc is the generalisation gap (train_acc is measured under dropout and augmentation)
    results["train_acc_eval"] = evaluate(model, data, cfg, split="train")[1]
    if cfg.occlusion:  # accuracy with a fraction f of the patches removed before the blocks, 5 draws (Table 3)
        results["occlusion"] = {"0.0": evaluate(model, data, cfg)[1], **{str(f): sum(
            evaluate(model, data, cfg, drop_patches=f)[1] for _ in range(5)) / 5 for f in (0.1, 0.3, 0.5, 0.7, 0.9)}}
    if cfg.attention_map:
        save_attention_map(model, data, os.path.join(cfg.out, "attention.png"))
    return results


# ----------------------------------------------------------------------------- the run folder

COLUMNS = [("epoch", 5, "d"), ("stage", 8, "s"), ("lr", 8, ".1e"), ("train_loss", 10, ".4f"), ("train_acc", 9, ".4f"),
           ("test_loss", 9, ".4f"), ("test_acc", 8, ".4f"), ("images_per_s", 12, ".0f"), ("time_s", 7, ".1f")]
CHECKPOINT_KEYS = ("model", "optimizer", "config", "epoch", "history", "results", "rng", "sha256")


def train(cfg, model, checkpoint, progress):
    """Train, then fine-tune, from scratch or from `checkpoint`. checkpoint.pt is each epoch's one commit; log.jsonl and
    metrics.json follow from it, never ahead: a run killed anywhere resumes to the folder of an uninterrupted run."""
    data = load_data(cfg, cfg.device)
    model.to(cfg.device)
    trained = torch.compile(model, fullgraph=True) if cfg.compile else model  # evaluations stay eager
    compile_errors = torch._dynamo.exc.TorchDynamoException if cfg.compile else ()  # raised at the first step
    optimizer, history, results = build_optimizer(model, cfg), [], {}
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)  # batch order and augmentation
    for name in [n for n in os.listdir(cfg.out) if n.endswith(".tmp")]:  # left by a run that died writing
        os.remove(os.path.join(cfg.out, name))
    if checkpoint is not None:  # everything that decides what happens next, the random states included
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])      # moves the moments to the parameters' device
        history, results, rng = checkpoint["history"], checkpoint["results"], checkpoint["rng"]
        torch.set_rng_state(rng["cpu"])
        if checkpoint["config"]["device"] == cfg.device:  # a generator's state is specific to its device type
            generator.set_state(rng["data"])
            if cfg.device != "cpu":
                getattr(torch, cfg.device).set_rng_state(rng[cfg.device])
        else:
            print(f"resuming a {checkpoint['config']['device']} run on {cfg.device}: weights, optimizer, step, "
                  f"history and the CPU random state are restored; batch order, augmentation and masks are not")
        write_results(cfg, history, results, model)
    if len(history) == (total := cfg.epochs + cfg.finetune_epochs):
        return print(f"{cfg.out} has finished all {total} epochs; log.jsonl and metrics.json are complete")
    print(f"{cfg.dataset}: {len(data['train'][0])} train / {len(data['test'][0])} test images on {cfg.device}; "
          f"{cfg.mode}, layer drop ratios {[round(r, 3) for r in model.layer_ratios]}; run folder {cfg.out}")
    print(" ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))
    for epoch in range(len(history), total):
        stage = "train" if epoch < cfg.epochs else "finetune"
        for block in model.blocks:  # Align Expectation by fine-tuning without attention dropout (Sec. 3.2)
            block.attn.mode = cfg.mode if stage == "train" else "none"
        try:
            stats = train_one_epoch(trained, optimizer, data, cfg, epoch, generator, progress)
        except compile_errors as e:
            raise DataError(f"--compile: torch.compile failed ({first_line(e)}); run without --compile") from None
        start_eval = time.perf_counter()
        test_loss, test_acc = evaluate(model, data, cfg)
        history.append(dict(epoch=epoch + 1, stage=stage, **stats, test_loss=test_loss, test_acc=test_acc,
                            eval_s=time.perf_counter() - start_eval))
        print(" ".join(f"{history[-1][name]:>{width}{fmt}}" for name, width, fmt in COLUMNS), flush=True)
        if epoch + 1 == cfg.epochs:
            results = paper_evaluations(model, data, cfg, plain_seconds=history[-1]["eval_s"])
        rng = {"cpu": torch.get_rng_state(), "data": generator.get_state(),  # uint8 tensors: weights_only loads them
               **{d: getattr(torch, d).get_rng_state() for d in ("cuda", "mps") if d == cfg.device}}
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=vars(cfg),
                     epoch=epoch + 1, history=history, results=results, rng=rng)
        torch.save(dict(state, sha256=checksum(state)), buffer := io.BytesIO())  # a full disk fails in atomic_save
        atomic_save(os.path.join(cfg.out, "checkpoint.pt"), buffer.getvalue())  # the commit
        metrics = write_results(cfg, history, results, model)
    print(to_json({k: round(v, 4) for k, v in metrics.items() if k.startswith("test_acc")}))


def write_results(cfg, history, results, model):
    """log.jsonl, then metrics.json (last epoch of each stage, evaluations, speed, config), as of `history`."""
    atomic_save(os.path.join(cfg.out, "log.jsonl"), "".join(to_json(r) + "\n" for r in history))
    trained, seconds = [r for r in history if r["stage"] == "train"], sum(r["time_s"] for r in history)
    metrics = {k: trained[-1][k] for k in ("test_acc", "test_loss", "train_acc", "train_loss")}
    metrics.update({"test_acc_finetuned": history[-1]["test_acc"]} if len(history) > cfg.epochs else {})
    metrics.update(results, epochs_done=len(history), finished=len(history) == cfg.epochs + cfg.finetune_epochs,
                   train_time_s=seconds, images_per_s=sum(r["images"] for r in history) / seconds,
                   params=sum(p.numel() for p in model.parameters()), layer_ratios=model.layer_ratios,
                   config=vars(cfg), torch=torch.__version__,
                   device=f"cuda ({torch.cuda.get_device_name()})" if cfg.device == "cuda" else cfg.device)
    atomic_save(os.path.join(cfg.out, "metrics.json"), to_json(metrics, indent=2))
    return metrics


def to_json(value, **kwargs):
    """Strict JSON (no NaN or Infinity tokens, which strict parsers reject): a non-finite number becomes null."""
    return json.dumps(json.loads(json.dumps(value), parse_constant=lambda token: None), allow_nan=False, **kwargs)


def atomic_save(path, data):
    """Write through path.tmp and os.replace: no reader or crash sees half a file; a failed write is one line."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise DataError(f"could not write {path} ({e.strerror or e}); the run folder keeps its last complete epoch: "
                        f"free some space or make it writable, then continue with --resume") from None


def checksum(state):
    """sha256 (hex) of a checkpoint: its JSON, each tensor as dtype and shape, then the tensors' bytes in order."""
    tensors = []
    text = json.dumps(state, default=lambda t: tensors.append(t) or f"{t.dtype}{list(t.shape)}")
    digest = hashlib.sha256(text.encode())
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_checkpoint(path):
    """A checkpoint of this script, loaded with weights_only=True (it cannot run code) and matching its sha256."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise DataError(f"refused to load {path}: weights_only takes only plain data ({first_line(e)})") from None
    if missing := [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]:
        raise DataError(f"{path} is not a checkpoint of this train_cifar.py (no {', '.join(missing)}); start anew")
    if checksum({k: v for k, v in checkpoint.items() if k != "sha256"}) != checkpoint["sha256"]:
        raise DataError(f"{path} does not match its checksum (damaged on disk or in transfer); restore a copy")
    return checkpoint


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def lock(out, held):
    """An flock on out/.lock while `held` is open: one writer per run folder; the OS drops it when its process ends."""
    f = held.enter_context(open(os.path.join(out, ".lock"), "a"))
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataError(f"{out} is in use by another train_cifar.py process; wait for it to end, or choose "
                        f"another --out") from None


# ----------------------------------------------------------------------------- the CIFAR files

DOWNLOAD_DEADLINE_S = 3600  # the whole tarball; each read also waits at most 60 s


def ensure_cifar(spec, data_dir):
    """The CIFAR folder; if missing: the tarball, downloaded unless present, its md5 checked, extracted beside it."""
    folder, tarball = os.path.join(data_dir, spec["folder"]), os.path.join(data_dir, os.path.basename(spec["url"]))
    if os.path.isdir(folder):
        return folder
    os.makedirs(data_dir, exist_ok=True)
    if not os.path.exists(tarball):
        download(spec["url"], tarball)
    with open(tarball, "rb") as f:
        md5 = hashlib.file_digest(f, "md5").hexdigest()
    if md5 != spec["md5"]:  # truncated or not the official file: never trusted again
        os.replace(tarball, tarball + ".bad")
        raise DataError(f"{tarball} has md5 {md5}, expected {spec['md5']}; moved it to {tarball}.bad, run again")
    # into a temporary folder, renamed into place; tarfile's "data" filter refuses absolute paths, links out, devices
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=data_dir) as tmp:
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(os.path.join(tmp, spec["folder"]), folder)           # fails if the tarball lacks the folder
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"could not extract {tarball} ({e}); delete it and run again") from None
    return folder


def download(url, path):
    """Stream `url` into path.part (continued by an HTTP Range request where allowed), then rename it into place."""
    part, deadline = path + ".part", time.monotonic() + DOWNLOAD_DEADLINE_S
    done = os.path.getsize(part) if os.path.exists(part) else 0
    print(f"downloading {url} -> {path}" + (f", continuing after {done} bytes" if done else ""), file=sys.stderr)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {}),
                                    timeout=60) as response:
            done = done if response.status == 206 else 0                    # 200: the whole file again
            size = done + int(response.headers["Content-Length"]) if response.headers["Content-Length"] else None
            bar = tqdm(total=size, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc="download")
            with open(part, "ab" if done else "wb") as f, bar:
                while chunk := response.read1(1 << 16):                     # returns what has arrived
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not complete after {DOWNLOAD_DEADLINE_S} s")
                    bar.update(f.write(chunk))
            if size and bar.n < size:
                raise ConnectionError(f"cut off after {bar.n} of {size} bytes")
    except (OSError, ValueError, http.client.HTTPException) as e:  # offline, refused, timed out, cut off, disk full
        raise DataError(f"could not download {url} ({e}); run again to continue it, or put the file at {path} "
                        f"yourself, or try --dataset synthetic") from None
    os.replace(part, path)


class CifarUnpickler(pickle.Unpickler):
    """Builds only what the official CIFAR files name; a plain pickle.load calls any global a file names (os.system)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "ndarray"): np.ndarray,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct, ("numpy", "dtype"): np.dtype}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: CIFAR files never name it; it could run code")
        return self.ALLOWED[(module, name)]


def read_batch(path, spec):
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one official CIFAR batch file."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()   # Python 2 str -> bytes
        data, labels = batch[b"data"], np.asarray(batch[spec["label_key"]], dtype=np.int64)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,) and len(data)
                and labels.shape == (len(data),) and np.all((0 <= labels) & (labels < spec["classes"]))):
            raise ValueError(f"expected b'data', uint8 N x 3072, N > 0, and N labels below {spec['classes']}")
    except Exception as e:  # missing, truncated, foreign or hostile: all mean "not an official batch file"
        raise DataError(f"{path} is not a valid CIFAR batch file ({type(e).__name__}: {e}); "
                        f"delete {os.path.dirname(path)} and run again") from None
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)  # rows: R, G, B


# ----------------------------------------------------------------------------- --summarize

def t_975(df):
    """The 0.975 quantile of Student's t: a table up to df = 30, then a Cornish-Fisher expansion (error < 1e-4)."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
             2.042)
    z = 1.959964
    return table[df - 1] if df <= 30 else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarize(folders, baseline=None):
    """A Markdown table of finished runs grouped by configuration (all but seed and out), mean ± sd per metric; with
    `baseline` ("key=value,..."), each other group minus it, paired by seed: mean, 95% paired-t interval, sign votes."""
    groups, left_out, scalar = {}, [], lambda v: type(v) in (int, float)
    for folder in folders:
        try:
            with open(os.path.join(folder, "metrics.json")) as f:
                m = json.load(f)
            config = {k: v for k, v in m["config"].items() if k != "out"}
            seed = config.pop("seed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{folder} holds no readable metrics.json of a run ({type(e).__name__}: {e})") from None
        if not m.get("finished"):
            left_out.append(folder)
            continue
        values = {k: v for k, v in m.items() if scalar(v)} | {f"{k}[{j}]": x for k, v in m.items() if isinstance(
            v, dict) and k != "config" for j, x in v.items() if scalar(x)}  # occlusion[0.5], ...
        values |= {f"{k} - test_acc": values[k] - values["test_acc"] for k in ("train_acc", "train_acc_eval")
                   if k in values and "test_acc" in values}
        if seed in (runs := groups.setdefault(json.dumps(config, sort_keys=True), {})):
            raise DataError(f"{folder} repeats seed {seed} of a configuration; give each seed one run folder")
        runs[seed] = values
    if not groups:
        raise DataError("none of the given run folders holds a finished run")
    configs, groups = [json.loads(key) for key in groups], list(groups.values())  # groups: [{seed: metrics}]
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    names = [",".join(f"{k}={c.get(k)}" for k in differ) or "all" for c in configs]
    metrics = list(dict.fromkeys(k for runs in groups for v in runs.values() for k in v))
    values = {k: [np.array([v[k] for v in runs.values() if k in v]) for runs in groups] for k in metrics}
    places = {k: 4 if max(abs(c.mean()) for c in values[k] if len(c)) < 10 else 1 for k in metrics}
    table = lambda head, cell: ["", f"| metric | {' | '.join(head)} |", "|---" * (len(head) + 1) + "|"] + [
        f"| {k} | {' | '.join(cell(k, i) for i in range(len(head)))} |" for k in metrics]
    lines = [f"{sum(map(len, groups))} runs in {len(groups)} configurations; common to all: "
             + ", ".join(f"{k}={configs[0][k]}" for k in keys if k not in differ) + "."]
    lines += ["Left out, not finished: " + ", ".join(left_out) + "."] * bool(left_out)
    cell = lambda c, p: f"{c.mean():.{p}f}" + (f" ± {c.std(ddof=1):.{p}f}" if len(c) > 1 else "") if len(c) else "—"
    lines += table([f"{n} (n={len(r)})" for n, r in zip(names, groups)], lambda k, i: cell(values[k][i], places[k]))
    if baseline is None:
        return "\n".join(lines)
    want = dict(item.partition("=")[::2] for item in baseline.split(","))
    matches = [i for i, c in enumerate(configs) if all(str(c.get(k)) == v for k, v in want.items())]
    if len(matches) != 1:
        raise DataError(f"--baseline {baseline} matches {len(matches)} configurations, not 1; they are: "
                        + "; ".join(names))
    base, others = groups[matches[0]], [i for i in range(len(groups)) if i != matches[0]]

    def paired(k, i):
        runs, p = groups[others[i]], places[k]
        d = np.array([runs[s][k] - base[s][k] for s in sorted(runs) if s in base and k in runs[s] and k in base[s]])
        if len(d) < 2:
            return f"{d[0]:+.{p}f} (1 seed)" if len(d) else "no shared seed"
        mean, half = d.mean(), t_975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        agree = int((np.sign(d) == np.sign(mean)).sum()) if mean else 0
        return f"{mean:+.{p}f} [{mean - half:.{p}f}, {mean + half:.{p}f}], {agree} of {len(d)}"
    lines += ["", f"Each configuration minus {names[matches[0]]}, paired by seed: mean difference [95% paired-t "
              "interval], seeds whose difference has the sign of the mean (a zero counts against)."]
    return "\n".join(lines + table([names[i] for i in others], paired))


# ----------------------------------------------------------------------------- command line

def number(kind, low, high=None, low_open=False):
    """argparse type: a `kind` in [low, high), or (low, high) with low_open; argparse names `kind` in its errors."""
    def parse(text):
        if (value := kind(text)) < low or (low_open and value == low) or (high is not None and value >= high):
            need = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range (need {need})")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser():
    p = argparse.ArgumentParser(prog="train_cifar.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")  # one line, no usage block
    add, count, positive = p.add_argument, number(int, 1), number(float, 0.0, low_open=True)
    add("--dataset", default="cifar10", choices=("cifar10", "cifar100", "synthetic"), help="synthetic: offline")
    add("--data-dir", default="data", help="holds the CIFAR tarball and folder; downloaded if missing")
    add("--limit-train", type=count, default=None, help="use the first N training images (all if unset)")
    add("--label-noise", type=number(float, 0.0, 1.0), default=0.0, help="move this fraction of training labels")
    add("--limit-test", type=count, default=None, help="use the first N test images (all if unset)")
    add("--mode", default="dropkey", choices=dropkey.MODES, help="attention dropout (README, Modes)")
    add("--drop-ratio", type=number(float, 0.0, 1.0), default=0.3, help="d; the paper's CIFAR setting")
    add("--schedule", default="decreasing", choices=dropkey.SCHEDULES, help="ratio per layer (Table 1)")
    add("--block-size", type=count, default=3, help="s of dropkey_block / dropkey_cross (Table 2)")
    add("--patch-size", type=count, default=4, help="pixels per patch side; must divide 32")
    add("--dim", type=count, default=192, help="token width")
    add("--depth", type=count, default=6, help="transformer blocks")
    add("--heads", type=count, default=3, help="attention heads; must divide --dim")
    add("--mlp-ratio", type=positive, default=2.0, help="MLP hidden width / --dim")
    add("--epochs", type=count, default=100, help="training epochs, before any fine-tune")
    add("--batch-size", type=count, default=128, help="images per step (and per eval batch)")
    add("--lr", type=positive, default=1e-3, help="peak learning rate of AdamW")
    add("--weight-decay", type=number(float, 0.0), default=0.05, help="on >= 2-D tensors only")
    add("--warmup-epochs", type=number(float, 0.0), default=10.0, help="linear warm-up, then cosine to 0")
    add("--label-smoothing", type=number(float, 0.0, 1.0), default=0.1, help="of the training loss")
    add("--seed", type=int, default=0, help="init, batch order, augmentation, masks, synthetic data")
    add("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda, mps, else cpu")
    add("--compile", action="store_true", help="train through torch.compile(model, fullgraph=True); eval stays eager")
    add("--finetune-epochs", type=number(int, 0), default=0, help="then without attention dropout (Table 4)")
    add("--finetune-lr", type=positive, default=1e-5, help="constant lr of the fine-tune (Sec. 4.1)")
    add("--mc-samples", type=number(int, 0), default=0, help="T > 0: also test with Monte-Carlo alignment (Table 4)")
    add("--align", default="none", choices=("none", "exact"), help="exact: also test with exact expected weights")
    add("--occlusion", action="store_true", help="also test with 10-90%% of the patches removed (Table 3)")
    add("--attention-map", action="store_true", help="write attention.png (Fig. 5)")
    add("--out", default=None, help="run folder; unset: runs/<mode>-<timestamp>")
    add("--resume", default=None, metavar="DIR", help="continue the run in DIR with its saved configuration")
    add("--progress", default="auto", choices=("auto", "on", "off"), help="progress bar; auto: on a terminal")
    add("--dry-run", action="store_true", help="check the configuration, build the model, exit")
    add("--summarize", nargs="+", metavar="DIR", help="mean ± sd of these finished runs by configuration; no training")
    add("--baseline", metavar="KEY=VALUE[,...]", help="with --summarize: subtract this configuration, paired by seed")
    return p


def resolve_device(name):
    """'auto' as the device it picks (cuda, else mps, else cpu), so that a run's config says where it ran."""
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return auto if name == "auto" else name


def resolve_config(args, parser, argv=None):
    """The run's configuration (a new Namespace) and the checkpoint to resume from. A resumed run keeps its saved
    configuration: a flag given that differs from it is refused, even one equal to its default, but --device."""
    runtime = ("resume", "progress", "dry_run", "summarize", "baseline")  # not part of a run's configuration
    if args.resume is None:
        config = {k: v for k, v in vars(args).items() if k not in runtime}
        out = args.out or os.path.join("runs", f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        return argparse.Namespace(**{**config, "device": resolve_device(args.device), "out": out}), None
    unset = object()  # argparse sets no default for a name the namespace already holds: only given flags change
    parsed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = {k: v for k, v in vars(parsed).items() if v is not unset}
    checkpoint = load_checkpoint(os.path.join(args.resume, "checkpoint.pt"))
    # a run continues in its own folder (to branch it, copy the folder); label_noise, compile: runs saved before them
    saved = {"label_noise": 0.0, "compile": False, **checkpoint["config"], "out": args.resume}
    for key in [k for k in given if k not in runtime + ("device",) and given[k] != saved.get(k)]:
        parser.error(f"--resume continues with the saved configuration; drop --{key.replace('_', '-')} "
                     f"(saved: {saved.get(key)})")
    device = resolve_device(args.device) if "device" in given else saved["device"]
    return argparse.Namespace(**{**saved, "device": device}), checkpoint


def check_config(cfg, parser):
    """Each configuration mistake as one error line, before any data is read; returns the model it built."""
    if cfg.warmup_epochs > cfg.epochs:
        parser.error(f"--warmup-epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}")
    if cfg.mc_samples and cfg.mode == "none":
        parser.error("--mc-samples needs a dropping --mode; 'none' drops nothing to average over")
    if not dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())[cfg.device]:
        parser.error(f"--device {cfg.device}, but this torch cannot use it; choose another --device")
    if cfg.device == "mps" and cfg.align == "exact":
        parser.error("--align exact computes in float64, which MPS does not support; use --device cpu or cuda")
    paths = [("--out", cfg.out)]  # checked without a write; --data-dir where it will download and extract
    if cfg.dataset != "synthetic" and not os.path.isdir(os.path.join(cfg.data_dir, CIFAR[cfg.dataset]["folder"])):
        paths.append(("--data-dir", cfg.data_dir))
    for flag, path in paths:
        existing = path
        while not os.path.exists(existing):                                # its nearest existing ancestor
            existing = os.path.dirname(existing.rstrip(os.sep)) or "."
        if not os.path.isdir(existing):
            parser.error(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
        if not os.access(existing, os.W_OK | os.X_OK):
            parser.error(f"{flag} {path}: cannot write in {existing} (read-only, no permission); choose another {flag}")
    try:
        model = build_model(cfg).eval()
        model.align = cfg.align  # one forward pass finds what the model refuses, e.g. exact alignment of a block mode
        model(torch.zeros(1, 3, 32, 32))
        model.align = "none"
    except ValueError as e:
        parser.error(str(e))
    return model


def main(argv=None):
    parser = build_parser()
    args, cfg = parser.parse_args(argv), None
    if args.baseline is not None and args.summarize is None:
        parser.error("--baseline needs --summarize")
    if args.baseline is not None and not all(k and "=" in k for k in args.baseline.split(",")):
        parser.error(f"--baseline {args.baseline}: expected KEY=VALUE[,KEY=VALUE...], e.g. mode=none")
    try:
        if args.summarize is not None:  # a dry run checks the flags only: the run folders may not exist yet
            return print(f"dry run: configuration is valid; would summarize {len(args.summarize)} run folders"
                         if args.dry_run else summarize(args.summarize, args.baseline))
        with contextlib.ExitStack() as held:  # the run folder's lock, released when main ends
            if args.resume is not None and not args.dry_run:  # locked before its checkpoint is read
                if not os.path.isdir(args.resume):
                    raise DataError(f"no run folder at {args.resume}")
                lock(args.resume, held)
            cfg, checkpoint = resolve_config(args, parser, argv)
            model = check_config(cfg, parser)
            if checkpoint is None and not args.dry_run:  # creates and locks the folder before any data is read
                os.makedirs(cfg.out, exist_ok=True)
                lock(cfg.out, held)
            if checkpoint is None and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
                parser.error(f"{cfg.out} holds a run already; continue it with --resume, or choose another --out")
            if args.dry_run:
                params = sum(p.numel() for p in model.parameters())
                return print(f"dry run: configuration is valid; {params} parameters, "
                             f"layer drop ratios {[round(r, 3) for r in model.layer_ratios]}, run folder {cfg.out}")
            progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
            train(cfg, model, checkpoint, progress)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # any other file-system fault, still one line
        sys.exit(f"error: {e}; check that path, its permissions and the free space")
    except KeyboardInterrupt:
        resumable = cfg is not None and os.path.exists(os.path.join(cfg.out, "checkpoint.pt"))
        sys.exit("interrupted" + (f"; continue with: python train_cifar.py --resume {cfg.out}" if resumable else ""))


if __name__ == "__main__":
    main()
