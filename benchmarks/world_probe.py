"""Fast check of the synthetic world: stage 2 alone, on ground-truth boxes, in a few minutes.

    uv run python benchmarks/world_probe.py --seeds 0 1 --out probe.json

For each seed: render a world in memory (the generator's own ``render_image``), cut RoIAlign crops
of every instance's (slightly jittered) box, train a small CNN classifier over all classes on them
(its last layer's rows are ``w_cls``, standing in for the detector's), freeze it, and train mask
heads on its 12x12 feature maps (24x24 crops):

* ``agnostic``    one 1x1 conv, the same for every class; trained on set A only
* ``transfer``    per-class 1x1 weights ``T(w_cls[c])``, T = 2 FC layers with LeakyReLU(0.1);
                  set A only; no regularisation of T
* ``transfer_reg``the same with T's input L2-normalised, dropout 0.5 on it, weight decay
* ``t_*``         with ``--ablate-t``: T with parts of that regularisation
* ``oracle``      per-class weights learnt freely on all classes (set A and B masks)
* ``transfer_reg_box``, ``transfer_reg_cls+box`` with ``--t-inputs``: T of ``transfer_reg`` reading
                  ``w_box`` (a per-class box regressor, 4 outputs per class, trained beside the
                  classifier on its detached features: its rows are ``w_box``) or both, as in the
                  paper's Table 3.1
* ``grabcut``     with ``--grabcut``: GrabCut (OpenCV) inside each jittered box, no training

Mean mask IoU (threshold 0.5 on 12x12 masks) over held-out crops of set B and of set A is
reported per split (``voc``: set A = the 20 VOC classes; ``random:40:S``: 40 random classes).
Weight decay (``--wd``) applies to agnostic, transfer_reg and oracle. Design switches
(``--looks``, ``--overlap``, ``--no-clutter``) reproduce the variants in docs/synthetic_world.md;
the world options (``--class-freq``, ``--shapes``, ``--appearance``) are the generator's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from _common import add_world_options, world_options  # noqa: E402  (puts the repo on sys.path)
from pipelines.data.grabcut import grabcut_in_box
from pipelines.data.splits import resolve_split
from pipelines.data.synthetic import (
    PALETTE,
    TEXTURES,
    SynthConfig,
    _extra_look,
    min_visible_area,
    render_image,
    synth_categories,
)

CROP, MASK = 24, 12


# --------------------------------------------------------------------------------------------
def make_looks(kind: str, cats: list[dict]) -> list[dict]:
    """Looks per class index. ``factor``: the generator's own; ``blocked``: the same 80 looks, but
    the 20 VOC classes get only 5 of the 10 colours; ``random``: an unstructured colour per class."""
    looks = [c["look"] for c in cats]
    if kind == "factor":
        return looks
    if kind == "random":
        return [_extra_look(1000 + i) for i in range(len(cats))]
    if kind == "blocked":
        voc = set(resolve_split("voc", cats))
        pairs = [(h, t) for h in range(len(PALETTE)) for t in range(len(TEXTURES))]
        a_pairs = [(h, t) for h in range(5) for t in range(8) if (t + h) % 2 == 0]  # colours 0-4 only
        b_pairs = [p for p in pairs if p not in set(a_pairs)]
        out, ia, ib = [], 0, 0
        for c in cats:
            if c["id"] in voc:
                h, t = a_pairs[ia]
                ia += 1
            else:
                h, t = b_pairs[ib]
                ib += 1
            out.append({"color": list(PALETTE[h][1]), "color_name": PALETTE[h][0], "texture": TEXTURES[t], "period": 6.0})
        return out
    raise SystemExit(f"unknown --looks {kind}")


@dataclass
class Crops:
    x: torch.Tensor  # float32[N, 3, CROP, CROP] in [0, 1]
    m: torch.Tensor  # float32[N, 1, MASK, MASK] in {0, 1}
    y: torch.Tensor  # int64[N] class index
    d: torch.Tensor  # float32[N, 4] box regression target: (dx, dy, log dw, log dh) from the jittered to the true box
    g: torch.Tensor | None = None  # float32[N, 1, MASK, MASK] GrabCut mask in the jittered box (with --grabcut)


def world_config(n_classes: int, seed: int, args) -> SynthConfig:
    return SynthConfig(num_classes=n_classes, image_size=128, seed=seed, max_objects=args.max_objects,
                       min_radius=args.min_radius, max_radius=args.max_radius, **world_options(args))


def render(n_images: int, seed: int, split_id: int, looks: list[dict], args, grabcut: bool = False) -> Crops:
    cfg = world_config(len(looks), seed, args)
    min_area = min_visible_area(cfg.image_size)
    xs, ms, ys, ds, gs = [], [], [], [], []
    jit = np.random.default_rng([seed, split_id, 99])
    for i in range(n_images):
        rng = np.random.default_rng([seed, split_id, i + 1])
        img, inst = render_image(rng, cfg, looks, min_area, overlap=args.overlap, clutter=not args.no_clutter)
        if not inst:
            continue
        boxes, masks, cuts = [], [], []
        for cls, vis in inst:
            yy, xx = np.nonzero(vis)
            x0, y0, x1, y1 = xx.min(), yy.min(), xx.max() + 1, yy.max() + 1
            w, h = x1 - x0, y1 - y0
            d = jit.uniform(-args.jitter, args.jitter, 4) * np.array([w, h, w, h])
            jb = [x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]]
            jw, jh = jb[2] - jb[0], jb[3] - jb[1]
            ds.append([((x0 + x1) - (jb[0] + jb[2])) / (2 * jw), ((y0 + y1) - (jb[1] + jb[3])) / (2 * jh),
                       np.log(w / jw), np.log(h / jh)])
            boxes.append(jb)
            masks.append(vis)
            ys.append(cls)
            if grabcut:
                cuts.append(grabcut_in_box(img, jb).astype(bool))
        b = torch.tensor(boxes, dtype=torch.float32)
        bi = torch.cat([torch.zeros(len(b), 1), b], 1)
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        xs.append(roi_align(t, bi, CROP, 1.0, 2, aligned=True))
        bm = torch.cat([torch.arange(len(b)).float()[:, None], b], 1)
        for out, full in ((ms, masks), (gs, cuts)):
            if full:
                mt = torch.from_numpy(np.stack(full)).float()[:, None]
                out.append((roi_align(mt, bm, MASK, 1.0, 2, aligned=True) >= 0.5).float())
    return Crops(torch.cat(xs), torch.cat(ms), torch.tensor(ys), torch.tensor(ds, dtype=torch.float32),
                 torch.cat(gs) if gs else None)


# --------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Crop float32[N, 3, 24, 24] -> trunk features float32[N, C, 12, 12] -> class logits [N, K]."""

    def __init__(self, k: int, c: int = 48, d: int = 128, with_box: bool = False):
        super().__init__()

        def block(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.trunk = nn.Sequential(block(3, 32, 1), block(32, c, 2), block(c, c, 1))
        self.head = nn.Sequential(block(c, 96, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, d), nn.ReLU())
        self.cls = nn.Linear(d, k)
        if with_box:  # per-class box regression on detached features (--t-inputs box / cls+box); made only then, so
            self.box = nn.Linear(d, 4 * k)  # that without it the random stream, and every number, is as before

    def forward(self, x):
        return self.cls(self.head(self.trunk(x)))

    def forward_box(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [N, K] and box deltas [N, K, 4]; the box loss does not reach the features
        (trained with it, the features lost most of their class information: crop accuracy 0.85 -> 0.33)."""
        z = self.head(self.trunk(x))
        return self.cls(z), self.box(z.detach()).view(len(x), -1, 4)


def train_classifier(tr: Crops, va: Crops, k: int, args, seed: int, with_box: bool = False) -> tuple[Classifier, float]:
    """The stand-in detector; with ``with_box`` it also regresses each crop's true box (smooth L1 on
    the deltas of its class, as Faster R-CNN's box head does), from features the box loss does not change."""
    torch.manual_seed(seed)
    net = Classifier(k, with_box=with_box)
    if args.detectron_init:  # Detectron's Fast R-CNN outputs: cls_score N(0, 0.01), bbox_pred N(0, 0.001), zero biases
        for layer, std in ((net.cls, 0.01), (net.box, 0.001)) if with_box else ((net.cls, 0.01),):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
    steps = args.cls_epochs * (len(tr.y) // 64)
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(tr.y), (64,), generator=g)
        if with_box:
            logits, deltas = net.forward_box(tr.x[idx])
            box = deltas[torch.arange(len(idx)), tr.y[idx]]
            loss = F.cross_entropy(logits, tr.y[idx]) + F.smooth_l1_loss(box / 0.1, tr.d[idx] / 0.1, beta=1.0 / 9)
        else:
            loss = F.cross_entropy(net(tr.x[idx]), tr.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(va.x[i : i + 512]).argmax(1) for i in range(0, len(va.y), 512)])
    return net, float((pred == va.y).float().mean())


class MaskHead(nn.Module):
    """Features float32[N, C, 12, 12] -> mask logits float32[N, 12, 12] for classes ``y`` int64[N]."""

    def __init__(self, kind: str, c: int, k: int, w_cls: torch.Tensor, hidden: int = 32, normalize=False, dropout=0.0):
        super().__init__()
        self.kind, self.normalize = kind, normalize
        self.convs = nn.Sequential(nn.Conv2d(c, hidden, 3, 1, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, 1, 1), nn.ReLU())
        if kind == "agnostic":
            self.pred = nn.Conv2d(hidden, 1, 1)
        elif kind == "oracle":
            self.w = nn.Parameter(torch.randn(k, hidden) * 0.05)
            self.b = nn.Parameter(torch.zeros(k))
        else:
            self.register_buffer("w_cls", w_cls)
            self.drop = nn.Dropout(dropout)
            self.t = nn.Sequential(nn.Linear(w_cls.shape[1], 256), nn.LeakyReLU(0.1), nn.Linear(256, hidden + 1))

    def forward(self, f, y):
        g = self.convs(f)
        if self.kind == "agnostic":
            return self.pred(g)[:, 0]
        if self.kind == "oracle":
            w, b = self.w[y], self.b[y]
        else:
            e = self.w_cls[y]
            if self.normalize:
                e = F.normalize(e, dim=1)
            wb = self.t(self.drop(e))
            w, b = wb[:, :-1], wb[:, -1]
        return torch.einsum("nchw,nc->nhw", g, w) + b[:, None, None]


def train_head(head: MaskHead, f: torch.Tensor, m: torch.Tensor, y: torch.Tensor, wd: float, args, seed: int) -> MaskHead:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), 2e-3, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.head_steps)
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(args.head_steps):
        idx = torch.randint(len(y), (64,), generator=g)
        loss = F.binary_cross_entropy_with_logits(head(f[idx], y[idx]), m[idx, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


@torch.no_grad()
def mean_iou(head: MaskHead, f, m, y, sel: torch.Tensor) -> float:
    idx = torch.nonzero(sel)[:, 0]
    if len(idx) == 0:
        return float("nan")
    pred = torch.cat([head(f[idx[i : i + 512]], y[idx[i : i + 512]]) > 0 for i in range(0, len(idx), 512)])
    gt = m[idx, 0] > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
    return float((inter / union).mean())


def masks_iou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean IoU of bool masks [N, 1, H, W] (float nan for none)."""
    if len(pred) == 0:
        return float("nan")
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
    return float((inter / union).mean())


@torch.no_grad()
def features(net: Classifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.trunk(x[i : i + 512]) for i in range(0, len(x), 512)])


# --------------------------------------------------------------------------------------------
def run_seed(seed: int, args) -> list[dict]:
    cats = synth_categories(80)
    looks = make_looks(args.looks, cats)
    t0 = time.time()
    tr = render(args.images, seed, 0, looks, args)
    va = render(args.val_images, seed, 1, looks, args, grabcut=args.grabcut)
    with_box = any("box" in t for t in args.t_inputs)
    net, acc = train_classifier(tr, va, len(cats), args, seed, with_box)
    for p in net.parameters():
        p.requires_grad_(False)
    ftr, fva = features(net, tr.x), features(net, va.x)
    w_cls = net.cls.weight.detach().clone()
    c, k = ftr.shape[1], len(cats)
    w_in = {"cls": w_cls}
    if with_box:
        w_in["box"] = net.box.weight.detach().view(k, -1).clone()  # w_box[c]: the 4 rows of class c
        w_in["cls+box"] = torch.cat([w_in["cls"], w_in["box"]], 1)
    index_of = {cat["id"]: i for i, cat in enumerate(cats)}
    oracle = train_head(MaskHead("oracle", c, k, w_cls), ftr, tr.m, tr.y, args.wd, args, seed)
    rows = []
    for split in args.splits:
        spec = split.replace("S", str(seed)) if split.startswith("random") else split
        in_a = torch.zeros(k, dtype=torch.bool)
        in_a[[index_of[i] for i in resolve_split(spec, cats)]] = True
        a_tr = in_a[tr.y]
        heads = {
            "agnostic": (MaskHead("agnostic", c, k, w_cls), args.wd),
            "transfer": (MaskHead("transfer", c, k, w_cls), 0.0),
            "transfer_reg": (MaskHead("transfer", c, k, w_cls, normalize=True, dropout=0.5), args.wd),
        }
        for t_input in args.t_inputs:
            if t_input != "cls":
                heads[f"transfer_reg_{t_input}"] = (MaskHead("transfer", c, k, w_in[t_input], normalize=True, dropout=0.5), args.wd)
        if args.ablate_t:  # which part of T's regularisation matters
            heads["t_norm"] = (MaskHead("transfer", c, k, w_cls, normalize=True), 0.0)
            heads["t_norm_drop"] = (MaskHead("transfer", c, k, w_cls, normalize=True, dropout=0.5), 0.0)
            heads["t_drop_wd"] = (MaskHead("transfer", c, k, w_cls, dropout=0.5), args.wd)
            heads["t_norm_wd"] = (MaskHead("transfer", c, k, w_cls, normalize=True), args.wd)
        row = {"seed": seed, "split": spec, "spec": split, "cls_acc": round(acc, 4), "train_crops_A": int(a_tr.sum())}
        for name, (head, wd) in heads.items():
            train_head(head, ftr[a_tr], tr.m[a_tr], tr.y[a_tr], wd, args, seed)
            row[name] = {"A": mean_iou(head, fva, va.m, va.y, in_a[va.y]), "B": mean_iou(head, fva, va.m, va.y, ~in_a[va.y])}
        row["oracle"] = {"A": mean_iou(oracle, fva, va.m, va.y, in_a[va.y]), "B": mean_iou(oracle, fva, va.m, va.y, ~in_a[va.y])}
        if va.g is not None:
            row["grabcut"] = {s_: masks_iou(va.g[sel] > 0.5, va.m[sel] > 0.5) for s_, sel in (("A", in_a[va.y]), ("B", ~in_a[va.y]))}
        row["train_crops_per_class_A"] = round(float(a_tr.sum()) / float(in_a.sum()), 1)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
    return rows


def extra_heads(row: dict) -> list[str]:
    """The optional rows of a result: T ablations, T on w_box, GrabCut."""
    return [h for h in row if h.startswith(("t_", "transfer_reg_")) or h == "grabcut"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--splits", nargs="+", default=["voc", "random:40:S"], help="S is replaced by the seed")
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--cls-epochs", type=int, default=6)
    ap.add_argument("--head-steps", type=int, default=300)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--jitter", type=float, default=0.08, help="box jitter, fraction of box size")
    ap.add_argument("--looks", default="factor", help="factor | blocked | random")
    ap.add_argument("--overlap", type=float, default=0.75)
    # the world's defaults; the tables in docs/synthetic_world.md were made with 5 / 9 / 24
    ap.add_argument("--max-objects", type=int, default=SynthConfig.max_objects)
    ap.add_argument("--min-radius", type=float, default=SynthConfig.min_radius)
    ap.add_argument("--max-radius", type=float, default=SynthConfig.max_radius)
    ap.add_argument("--no-clutter", action="store_true")
    add_world_options(ap)
    ap.add_argument("--t-inputs", nargs="+", default=["cls"], choices=["cls", "box", "cls+box"],
                    help="inputs of the regularised T (box needs the classifier's box regression, trained when asked for)")
    ap.add_argument("--grabcut", action="store_true", help="also score GrabCut inside each jittered validation box")
    ap.add_argument("--detectron-init", action="store_true",
                    help="initialise the class and box output layers as Detectron does (N(0, 0.01), N(0, 0.001)) instead of torch's default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ablate-t", action="store_true", help="also train T with parts of its regularisation")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heads = ["agnostic", "transfer", "transfer_reg", "oracle"]
    print(f"{'seed':>4} {'split':<12} {'acc':>5} " + " ".join(f"{h + ' A/B':>17}" for h in heads) + "  B ratio reg/agn", flush=True)

    def line(r):
        cells = " ".join(f"{r[h]['A']:>8.3f}/{r[h]['B']:.3f}" for h in heads)
        return f"{r['seed']:>4} {r['split']:<12} {r['cls_acc']:>5.2f} {cells}  {r['transfer_reg']['B'] / r['agnostic']['B']:.2f}"

    if args.out:
        open(args.out, "a").close()  # fail now, not after the run, if it cannot be written
    rows = []
    for seed in args.seeds:
        for r in run_seed(seed, args):
            rows.append(r)
            print(line(r), flush=True)
            extra = extra_heads(r)
            if extra:
                print("     " + "  ".join(f"{h} {r[h]['A']:.3f}/{r[h]['B']:.3f}" for h in extra), flush=True)
        if args.out:  # after every seed, so an interrupted run keeps what it has
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    for split in dict.fromkeys(r["spec"] for r in rows):
        sel = [r for r in rows if r["spec"] == split]
        extra = extra_heads(sel[0])
        mean = {h: {s: float(np.mean([r[h][s] for r in sel])) for s in "AB"} for h in heads + extra}
        print(line({"seed": "mean", "split": split, "cls_acc": float(np.mean([r["cls_acc"] for r in sel])), **mean}), flush=True)
        if extra:
            print("     " + "  ".join(f"{h} {mean[h]['A']:.3f}/{mean[h]['B']:.3f}" for h in extra), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
