"""``prcl``: probabilistic representation contrastive learning for semi-supervised segmentation
(Xie et al., AAAI 2023, arXiv 2210.14670), with the 2024 extension's Global Distribution
Prototypes and Virtual Negatives (arXiv 2402.18117), both switchable (``gdp``, ``vn``).

Per step: the EMA teacher pseudo-labels the weakly augmented unlabeled batch; a strong view is
made from it on the device (rescale + crop + flip, ClassMix, colour jitter, blur); the student sees
the labeled batch and the strong view together. Loss = CE(labeled) + confidence-weighted
CE(strong view, pseudo-labels) + lambda(t) x contrast, where every pixel is a Gaussian (mu, sigma^2)
and similarities are mutual likelihood scores against precision-weighted prototypes.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import BenchError, distributed
from bench.losses import masked_cross_entropy
from bench.method import Method, MethodConfig
from bench.registry import register_method
from bench.semi import (EMATeacher, StrongAugment, class_mix_masks, next_in_batch, paste, pseudo_labels,
                        random_rescale_crop)


class PRCLConfig(MethodConfig):
    rep_dim: int = 256  # representation (mu, sigma^2) dimension
    # the reference's VOC/Cityscapes configs use temp 100 for both the MLS logits and the
    # negative-class distribution (ReCo, its base, used 0.5 with cosine similarities)
    temperature: float = 100.0
    num_queries: int = 256  # anchors per class and step
    num_negatives: int = 512  # real negatives per anchor
    strong_threshold: float = 0.97  # unsupervised CE weight = fraction of pixels this confident
    weak_threshold: float = 0.7  # unlabeled pixels this confident take part in the contrast
    anchor_threshold: float = 0.8  # anchors: valid pixels whose own-class probability is below this
    ema_decay: float = 0.99  # teacher decay = min(1 - 1/(step + 1), ema_decay)
    unsup_weight: float = 1.0
    contrast_weight: float = 1.0  # lambda(t) = contrast_weight * exp(-5 (t / T)^2)
    variance_lr: float = 5e-5  # absolute LR of the sigma^2 head (the reference warns it is sensitive)
    strong_scale: Optional[tuple[float, float]] = None  # None: the protocol's rescale range, as the reference
    gdp: bool = True  # Global Distribution Prototypes as positives and for negative-class sampling
    vn: bool = True  # Virtual Negatives sampled around other classes' global prototypes
    num_virtual: int = 4  # virtual negatives per other class (the authors' snapshot: 4, radius 1)
    virtual_radius: float = 1.0
    eval_network: Literal["teacher", "student"] = "teacher"
    # ClassMix: how many classes of an image are kept (the rest is pasted from the next image).
    # "floor_unique": len(unique label values) // 2, the ignore value counted and choosable like a
    # class (the reference's generate_class_mask); "ceil_present": half of the present classes
    # rounded up, ignore never chosen
    classmix_count: Literal["floor_unique", "ceil_present"] = "floor_unique"
    # how the elementwise-heavy parts run (the same formulas either way): the contrast's
    # [anchors x keys x dims] terms and the variance head's tail. "eager": torch ops, about a dozen
    # passes over each contrast block; "compiled": torch.compile kernels (the contrast's gather,
    # MLS, softmax and gradient fused per block: 2-3x faster on a CPU at the reference sizes), equal
    # to "eager" to float rounding, so runs differ from eager ones in the last bits, then by
    # seed-level noise; needs a working torch.compile (a C++ compiler on CPU, triton on CUDA) and
    # compiles for about a minute on first use
    kernels: Literal["eager", "compiled"] = "eager"


# --- the probabilistic pieces ---------------------------------------------------------------------

def mutual_likelihood_score(mu0: torch.Tensor, var0: torch.Tensor, mu1: torch.Tensor, var1: torch.Tensor) -> torch.Tensor:
    """MLS = -1/2 * mean_d [ (mu0 - mu1)^2 / (var0 + var1) + log(var0 + var1) ], broadcasting over
    leading dimensions. Symmetric in its two Gaussians; higher = more likely the same.

    The reference's MLS L2-normalises both means first; here the callers pass unit means
    (``PRCL.contrast`` normalises pixels once and prototypes after fusing them from raw means),
    which is the same number without renormalising every [anchors x negatives] block."""
    s = var0 + var1
    return -0.5 * ((mu0 - mu1) ** 2 / s + torch.log(s)).mean(-1)


def fuse_gaussians(mu: torch.Tensor, var: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """Precision-weighted product of the Gaussians of each group:
    sigma_p^2 = 1 / sum_i 1/sigma_i^2,  mu_p = sum_i (sigma_p^2 / sigma_i^2) mu_i.
    Returns (mu_p [G, D], var_p [G, D], count [G]); groups without members get mu 0, var 1."""
    precision = 1.0 / var
    p_sum = torch.zeros(num_groups, mu.shape[1], dtype=mu.dtype, device=mu.device).index_add_(0, groups, precision)
    m_sum = torch.zeros_like(p_sum).index_add_(0, groups, precision * mu)
    count = torch.bincount(groups, minlength=num_groups)
    empty = (count == 0)[:, None]
    var_p = torch.where(empty, torch.ones_like(p_sum), 1.0 / p_sum.clamp(min=torch.finfo(p_sum.dtype).tiny))
    mu_p = torch.where(empty, torch.zeros_like(m_sum), m_sum * var_p)
    return mu_p, var_p, count


class VarianceHead(nn.Module):
    """sigma^2 head: weight-normalised linear -> BN -> ReLU -> weight-normalised linear -> BN (no
    affine) -> scalar affine -> sigma^2 = sigmoid(log(e^x + 1e-6)), in (0, 1)."""

    def __init__(self, cin: int, dim: int, kernels: str = "eager"):
        super().__init__()
        self.kernels = kernels
        self.fc1 = nn.Parameter(torch.empty(dim, cin))
        self.fc2 = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.fc1, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.fc2, a=math.sqrt(5))
        self.bn1 = nn.BatchNorm2d(dim)
        self.bn2 = nn.BatchNorm2d(dim, affine=False)
        self.gamma = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        # per-pixel linear layers as 1x1 convolutions (faster than einsum on every device)
        x = F.conv2d(x, F.normalize(self.fc1, dim=1)[:, :, None, None])
        x = F.relu(self.bn1(x))
        x = self.bn2(F.conv2d(x, F.normalize(self.fc2, dim=1)[:, :, None, None]))
        if self.kernels == "compiled":
            return compiled("variance_tail", variance_tail, dynamic=False)(x, self.gamma, self.beta)
        return variance_tail(x, self.gamma, self.beta)


def variance_tail(x, gamma, beta):
    """sigma^2 = sigmoid(log(e^(gamma x + beta) + 1e-6)), clamped below 1, in channels-last memory
    (so the contrast's per-pixel view of it is free)."""
    x = gamma * x + beta
    # log(e^x + 1e-6); the clamp only guards exp against overflow (sigmoid(80) is 1 anyway)
    x = torch.log(torch.exp(x.float().clamp(max=80.0)) + 1e-6)
    # the clamp keeps sigma^2 < 1 where sigmoid rounds to 1 in float32
    return torch.sigmoid(x).clamp(max=1 - 1e-6).contiguous(memory_format=torch.channels_last)


_compiled = {}


def compiled(name: str, fn, dynamic: bool):
    """``torch.compile(fn)``, made once per process (``prcl.kernels=compiled``)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=dynamic)
    return _compiled[name]


# --- sampling -------------------------------------------------------------------------------------

def sample_members(member_class: torch.Tensor, wanted: torch.Tensor, num_classes: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """For every entry of ``wanted`` (class ids, any shape), the index of a uniformly random
    element of ``member_class`` with that class (with replacement). Every wanted class must have
    a member. One sort, one bincount, then per draw: offset = floor(r x n_class), clamped to the
    class's last member (r x n can round up to n in float32). No loop over anchors or classes;
    per-class tables read with ``index_select`` (several times faster than advanced indexing), two
    per draw, in int32 (half the memory traffic of int64; class sizes are far below 2^24, where
    the float32 product would stop being exact anyway)."""
    order = torch.argsort(member_class, stable=True)
    counts = torch.bincount(member_class, minlength=num_classes)
    starts = (torch.cumsum(counts, 0) - counts).int()
    flat = wanted.reshape(-1)
    r = torch.rand(wanted.shape, generator=generator, device=wanted.device).view(-1)
    n = counts.to(r.dtype).index_select(0, flat)
    offset = r.mul_(n).int()  # the float32 product, as r * n
    torch.minimum(offset, n.int().sub_(1), out=offset)
    return order.index_select(0, offset.add_(starts.index_select(0, flat))).view(wanted.shape)


def draw_categorical(probs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws with replacement from each row of ``probs`` [R, C], by inverse CDF: with
    u ~ U(0, total), the draw is the first column whose CDF exceeds u (``searchsorted(cdf, u,
    right=True)``, clamped to C - 1). Only columns of positive probability in some row can be that
    column (the others are flat steps of every row's CDF), so the draw is found by counting how
    many of their CDF entries are <= u: one comparison of all rows per such column (a column of
    probability 0 in one row has that row's previous CDF value, so counting it skips it, as
    ``searchsorted`` does), the count looked up among those columns. The same draws as
    ``searchsorted``, which on CPU is several times slower than these few contiguous passes.
    Classes of probability 0 are never drawn."""
    cdf = torch.cumsum(probs, 1)
    u = torch.rand(len(probs), n, generator=generator, device=probs.device).mul_(cdf[:, -1:])
    columns = (probs > 0).any(0).nonzero().squeeze(1)
    # u rounded up to the total passes every column: searchsorted's clamp gives the last column
    table = torch.cat([columns, columns.new_tensor([probs.shape[1] - 1])])
    counted = columns.tolist()
    if counted and counted[-1] == probs.shape[1] - 1:  # the last class: passing it or not draws it
        counted.pop()
    below = torch.zeros(u.shape, dtype=torch.uint8 if len(counted) < 255 else torch.int32, device=u.device)
    drawn = torch.empty(u.shape, dtype=torch.bool, device=u.device)
    for j in counted:
        torch.ge(u, cdf[:, j:j + 1], out=drawn)
        below.add_(drawn.view(torch.uint8) if below.dtype == torch.uint8 else drawn)
    return table.index_select(0, below.view(-1).int()).view(u.shape)


def sample_contrast_set(labels: torch.Tensor, hard: torch.Tensor, proto_mu: torch.Tensor, proto_var: torch.Tensor,
                        has_proto: torch.Tensor, num_classes: int, num_queries: int, num_negatives: int,
                        temperature: float, generator: torch.Generator | None = None):
    """Anchors and negatives for the probabilistic contrast, vectorised.

    ``labels`` [M]: class of each valid pixel; ``hard`` [M]: whether it may be an anchor.
    A class gives ``num_queries`` anchors (random hard pixels, with replacement) if it is present
    in the batch, has a hard pixel, and at least one other present class exists. Each anchor gets
    ``num_negatives`` negatives: the class is drawn from softmax(MLS(proto_c, proto_k) / T) over
    the other present classes k, the pixel uniformly among that class's valid pixels.
    Returns (anchor_classes [A], anchor_index [A, Q], negative_index [A, Q, N], class_probs [A, C]).
    """
    device = labels.device
    present = torch.bincount(labels, minlength=num_classes) > 0
    n_hard = torch.bincount(labels[hard], minlength=num_classes)
    anchor_classes = (present & (n_hard > 0) & has_proto).nonzero().squeeze(1)
    if int(present.sum()) < 2 or anchor_classes.numel() == 0:
        e = torch.zeros(0, dtype=torch.long, device=device)
        return e, e.view(0, num_queries), e.view(0, num_queries, num_negatives), torch.zeros(0, num_classes, device=device)
    a = anchor_classes.numel()
    hard_index = hard.nonzero().squeeze(1)
    anchor_index = hard_index[sample_members(labels[hard_index], anchor_classes[:, None].expand(a, num_queries),
                                             num_classes, generator)]
    sim = mutual_likelihood_score(proto_mu[anchor_classes, None], proto_var[anchor_classes, None],
                                  proto_mu[None], proto_var[None]) / temperature  # [A, C]
    allowed = present[None] & (torch.arange(num_classes, device=device)[None] != anchor_classes[:, None])
    probs = torch.softmax(sim.masked_fill(~allowed, float("-inf")), dim=1)
    neg_classes = draw_categorical(probs, num_queries * num_negatives, generator)
    negative_index = sample_members(labels, neg_classes.view(a, num_queries, num_negatives), num_classes, generator)
    return anchor_classes, anchor_index, negative_index, probs


# elements of one [anchors x keys x dims] block of the contrast (4 MB in float32, a few blocks live
# at once): the contrast's memory is bounded by this, not by anchors x negatives x dims; on a busy
# 2-core CPU 1M-element blocks were as fast as any size tried from 64k to 16M
MLS_BLOCK_ELEMENTS = 1 << 20


def _mls_block(mu, var, k_mu, k_var):
    """MLS of anchors (mu, var) [q, 1, D] with keys [q or 1, K, D] -> [q, K], the same operations in
    the same order as ``mutual_likelihood_score`` (so the same numbers), and the two factors of its
    gradient: dMLS/dmu0 = -t / D with t = (mu0 - mu1) / s, dMLS/dvar0 = w / (2 D) with
    w = ((mu0 - mu1)^2 / s - 1) / s."""
    s = var + k_var
    diff = mu - k_mu
    sq = diff.square().div_(s)
    mls = -0.5 * (sq + torch.log(s)).mean(-1)
    return mls, diff.div_(s), sq.sub_(1).div_(s)


def _mls_block_gradients(mu, var, idx, key_mu, key_var, temperature: float):
    """One block of whole rows in one pass: logits [q, K] = MLS(anchor q, key rows ``idx[q]``) and
    the sums over keys of MLS's two gradient factors weighted by dCE/dlogit x T (key 0 the
    positive), so dL/dmu = -g_mu / (Q T D), dL/dvar = g_var / (2 Q T D) (see ``_mls_block``).
    Written for ``torch.compile``, which fuses the gather and the elementwise terms into one loop."""
    s = var[:, None] + key_var[idx]
    diff = mu[:, None] - key_mu[idx]
    t = diff / s
    sq = diff * t
    # sum_d log(s) as the logs of products of 4 (a quarter of the logs: about 10% of the kernel);
    # every s holds a pixel's variance (in [1e-6, 1) from the variance head) and lies below 2, so a
    # product of 4 stays within float32's normal range
    n = s.shape[-1] // 4
    logs = torch.log(s[..., :n] * s[..., n:2 * n] * s[..., 2 * n:3 * n] * s[..., 3 * n:4 * n]).sum(-1)
    if s.shape[-1] % 4:
        logs = logs + torch.log(s[..., 4 * n:]).sum(-1)
    mls = -0.5 * (sq.sum(-1) + logs) / s.shape[-1]
    w = (sq - 1) / s
    g = torch.softmax(mls / temperature, 1)
    g = g - (torch.arange(g.shape[1], device=g.device) == 0).to(g)
    return mls, torch.bmm(g[:, None], t).squeeze(1), torch.bmm(g[:, None], w).squeeze(1)


_key_tables = {}


def _key_table(pos_mu, pos_var, pool_mu, pool_var, v_mu, v_var):
    """The compiled contrast's keys as one table [pool; positive; virtual]. Every anchor class of a
    step passes the same pool tensors, so the pool is copied once per step, not once per class: the
    table is kept with the pool it was copied from (a reference, so the check is identity, never
    an address a new tensor could reuse, and the pool's version counter, so an in-place change
    rebuilds it) and only the positive and virtual rows are written again."""
    r, need = len(pool_mu), len(pool_mu) + 1 + len(v_mu)
    versions = (pool_mu._version, pool_var._version)
    table = _key_tables.get("table")
    if (table is None or _key_tables["pool"][0] is not pool_mu or _key_tables["pool"][1] is not pool_var
            or _key_tables["versions"] != versions or len(table[0]) < need):
        rows = r + 1 + max(len(v_mu), 64)  # room for the virtual negatives of any class this step
        table = (pool_mu.new_empty(rows, pool_mu.shape[1]), pool_var.new_empty(rows, pool_var.shape[1]))
        table[0][:r], table[1][:r] = pool_mu, pool_var
        _key_tables.update(table=table, pool=(pool_mu, pool_var), versions=versions)
    for t, pos, v in zip(table, (pos_mu, pos_var), (v_mu, v_var)):
        t[r] = pos
        t[r + 1:need] = v
    return table[0][:need], table[1][:need]


class _ContrastCE(torch.autograd.Function):
    """Mean over anchors of CE([MLS(anchor, positive), MLS(anchor, negatives), MLS(anchor,
    virtual)] / T, target 0), computed block by block over the anchors. A block holds whole rows
    (every key of its anchors), so its softmax, hence its gradient, is known in the forward: the
    [anchors x keys x dims] terms never exist beyond one block and are never recomputed; the
    backward only scales the saved [Q, D] gradients. Keys carry no gradient (the reference samples
    them under no_grad)."""

    @staticmethod
    def forward(ctx, a_mu, a_var, pos_mu, pos_var, pool_mu, pool_var, negative_index, v_mu, v_var, temperature, block,
                backend="eager"):
        # in the inputs' precision under autocast too: its matrix products would otherwise run in half
        with torch.autocast(a_mu.device.type, enabled=False):
            if backend == "compiled":
                return _ContrastCE._forward_compiled(ctx, a_mu, a_var, pos_mu, pos_var, pool_mu, pool_var,
                                                     negative_index, v_mu, v_var, temperature, block)
            return _ContrastCE._forward(ctx, a_mu, a_var, pos_mu, pos_var, pool_mu, pool_var, negative_index,
                                        v_mu, v_var, temperature, block)

    @staticmethod
    def _forward_compiled(ctx, a_mu, a_var, pos_mu, pos_var, pool_mu, pool_var, negative_index, v_mu, v_var,
                          temperature, block):
        q_all, d = a_mu.shape
        keys = 1 + negative_index.shape[1] + len(v_mu)
        # dynamic shapes: blocks, keys and virtual negatives vary
        fn = compiled("mls_block_gradients", _mls_block_gradients, dynamic=True)
        key_mu, key_var = _key_table(pos_mu, pos_var, pool_mu, pool_var, v_mu, v_var)
        r = len(pool_mu)
        index = torch.cat([negative_index.new_full((q_all, 1), r), negative_index,
                           torch.arange(r + 1, r + 1 + len(v_mu), device=negative_index.device).expand(q_all, -1)], 1)
        g_mu, g_var = torch.empty_like(a_mu), torch.empty_like(a_var)
        logits = a_mu.new_empty(q_all, keys)
        step = max(1, block // (keys * d))
        for start in range(0, q_all, step):
            rows = slice(start, start + step)
            try:
                out = fn(a_mu[rows], a_var[rows], index[rows], key_mu, key_var, temperature)
            except Exception as e:  # a missing compiler, an unsupported device: say which switch to change
                first = (str(e).strip().splitlines() or [""])[0]
                raise BenchError(f"prcl.kernels=compiled: torch.compile failed ({type(e).__name__}: {first}); "
                                 "use prcl.kernels=eager") from e
            logits[rows], g_mu[rows], g_var[rows] = out
        scale = 1.0 / (q_all * temperature * d)
        ctx.save_for_backward(g_mu.mul_(-scale), g_var.mul_(0.5 * scale))
        return F.cross_entropy(logits / temperature, torch.zeros(q_all, dtype=torch.long, device=logits.device))

    @staticmethod
    def _forward(ctx, a_mu, a_var, pos_mu, pos_var, pool_mu, pool_var, negative_index, v_mu, v_var, temperature, block):
        q_all, d = a_mu.shape
        keys = 1 + negative_index.shape[1] + len(v_mu)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_mu, g_var = torch.zeros_like(a_mu), torch.zeros_like(a_var)
        logits = a_mu.new_empty(q_all, keys)
        step = max(1, block // (keys * d))
        for start in range(0, q_all, step):
            rows = slice(start, start + step)
            mu, var, idx = a_mu[rows, None], a_var[rows, None], negative_index[rows]
            shape = (*idx.shape, d)
            parts = [_mls_block(mu, var, pos_mu.view(1, 1, d), pos_var.view(1, 1, d)),
                     _mls_block(mu, var, pool_mu.index_select(0, idx.reshape(-1)).view(shape),
                                pool_var.index_select(0, idx.reshape(-1)).view(shape)),
                     _mls_block(mu, var, v_mu[None], v_var[None])]
            logits[rows] = torch.cat([p[0] for p in parts], 1)
            if need:
                # dL/dlogit = (softmax - onehot(0)) / (Q T); chain through MLS's two factors
                g = torch.softmax(logits[rows] / temperature, 1)
                g[:, 0] -= 1
                g = g / (q_all * temperature * d)
                for (_, t, w), g_part in zip(parts, g.split([p[0].shape[1] for p in parts], 1)):
                    g_part = g_part[:, None]  # [q, 1, K] @ [q, K, D]
                    g_mu[rows] -= torch.bmm(g_part, t.expand(len(g_part), -1, -1)).squeeze(1)
                    g_var[rows] += 0.5 * torch.bmm(g_part, w.expand(len(g_part), -1, -1)).squeeze(1)
        ctx.save_for_backward(g_mu, g_var)
        return F.cross_entropy(logits / temperature, torch.zeros(q_all, dtype=torch.long, device=logits.device))

    @staticmethod
    def backward(ctx, grad):
        g_mu, g_var = ctx.saved_tensors
        return (grad * g_mu, grad * g_var) + (None,) * 10


def contrast_loss(anchor_mu, anchor_var, pos_mu, pos_var, pool_mu, pool_var, negative_index, temperature: float,
                  virtual: tuple[torch.Tensor, torch.Tensor] | None = None, block: int | None = None,
                  backend: Literal["eager", "compiled"] = "eager") -> torch.Tensor:
    """CE over [positive, negatives] with MLS / T logits, the positive at index 0; mean over anchors.
    anchor_* [Q, D], pos_* [D]; the negatives of anchor q are the rows ``negative_index[q]`` [N] of
    the pool (pool_* [R, D]), then the ``virtual`` (mu, var) [V, D] shared by every anchor. Never
    materialises [Q, N, D]: anchors in blocks of at most ``block`` x keys x D elements (default
    ``MLS_BLOCK_ELEMENTS``). The gradient reaches the anchors only (keys must not require grad).
    ``backend``: ``PRCLConfig.kernels``."""
    if any(x.requires_grad for x in (pos_mu, pos_var, pool_mu, pool_var, *(virtual or ()))):
        raise ValueError("contrast_loss: the positive, negatives and virtual negatives must not require grad")
    if virtual is None:
        virtual = (anchor_mu.new_zeros(0, anchor_mu.shape[1]),) * 2
    return _ContrastCE.apply(anchor_mu, anchor_var, pos_mu, pos_var, pool_mu, pool_var, negative_index,
                             virtual[0], virtual[1], temperature, block or MLS_BLOCK_ELEMENTS, backend)


@torch.no_grad()
def virtual_negatives(proto_mu: torch.Tensor, proto_var: torch.Tensor, seen: torch.Tensor, anchor_class: int,
                      per_class: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual negatives for anchors of ``anchor_class``: ``per_class`` reparameterised samples
    mu_k + radius * sigma_k * eps around the global prototype of every other seen class k (present
    in the batch or not), shared by the anchors of the class. Their variance is 0, as in the
    authors' snapshot, so their MLS with an anchor uses the anchor's sigma^2 alone.
    Returns (mu [V, D], var [V, D]), V = per_class x (number of other seen classes)."""
    other = seen.clone()
    other[anchor_class] = False
    mu, var = proto_mu[other], proto_var[other]
    eps = torch.randn(len(mu), per_class, mu.shape[1], device=mu.device, dtype=mu.dtype)
    samples = (mu[:, None] + radius * var.sqrt()[:, None] * eps).reshape(-1, mu.shape[1])
    return samples, torch.zeros_like(samples)


# --- the strong view ------------------------------------------------------------------------------

# the reference's strong photometric augmentation: colour jitter (0.25 each, p 0.8), no grayscale,
# blur (p 0.5, sigma ~ U(0.15, 1.15), 7 taps)
PRCL_STRONG = StrongAugment(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25, gray_p=0.0, blur_p=0.5,
                            blur_sigma=(0.15, 1.15), blur_kernel=7)


# --- the method -----------------------------------------------------------------------------------

@register_method
class PRCL(Method):
    name = "prcl"
    needs = frozenset({"pixel_labels", "unlabeled_images"})
    code_revision = 1  # 1: contrast / present classes, prototypes of raw means normalised (issue 14)
    output = "classes"
    Config = PRCLConfig

    def __init__(self, cfg: PRCLConfig, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()
        dim = self.model.feature_dim
        # mu head: 3x3 conv -> BN -> ReLU -> 1x1 conv; hidden width = the decoder's (256 in the
        # reference, the protocol's head_channels here)
        self.mean_head = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                                       nn.ReLU(inplace=True), nn.Conv2d(dim, cfg.rep_dim, 1))
        self.variance_head = VarianceHead(dim, cfg.rep_dim, cfg.kernels)
        # parameters-only EMA; the teacher pseudo-labels in train mode (batch statistics), as the
        # reference's does
        self.teacher = EMATeacher(self.model, cfg.ema_decay, "ramp", buffers=False, mode="train")
        self.eval_network = "ema_teacher" if cfg.eval_network == "teacher" else "student"
        c = ctx.num_classes
        # Global Distribution Prototypes: mean and precision (1 / sigma^2) per class, and whether
        # the class was seen yet; buffers, so they are in every checkpoint
        self.register_buffer("gdp_mu", torch.zeros(c, cfg.rep_dim))
        self.register_buffer("gdp_precision", torch.zeros(c, cfg.rep_dim))
        self.register_buffer("gdp_seen", torch.zeros(c, dtype=torch.bool))

    def param_groups(self, stage="train"):
        return self.model.param_groups() + [
            {"params": list(self.mean_head.parameters()), "name": "mean_head"},
            {"params": list(self.variance_head.parameters()), "name": "variance_head",
             "lr_mult": self.cfg.variance_lr / self.ctx.lr}]

    # the teacher and the views ------------------------------------------------------------------

    @torch.no_grad()
    def pseudo_label(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher argmax and max probability on the weak view, at input resolution."""
        return pseudo_labels(self.teacher(images))

    @torch.no_grad()
    def strong_view(self, images, labels, conf):
        """Rescale + crop + flip, ClassMix with the next image, colour jitter (p 0.8), blur (p 0.5);
        labels and confidences follow the geometry (padding -> ignore, confidence 0)."""
        cfg, ignore = self.cfg, self.ctx.ignore_index
        images, labels, conf, _ = random_rescale_crop(images, cfg.strong_scale or self.ctx.scale, labels, conf, ignore)
        mask = class_mix_masks(labels, self.ctx.num_classes, ignore, count=cfg.classmix_count)
        images, labels, conf = (paste(mask, next_in_batch(x), x) for x in (images, labels, conf))
        return PRCL_STRONG(images), labels, conf

    # the step -----------------------------------------------------------------------------------

    def training_step(self, batch, step, stage="train"):
        cfg, ignore = self.cfg, self.ctx.ignore_index
        lab_images, lab_masks = batch["labeled"]["image"], batch["labeled"]["mask"]
        weak = batch["unlabeled"]["image"]
        pseudo, conf = self.pseudo_label(weak)
        strong, pseudo, conf = self.strong_view(weak, pseudo, conf)

        nl = len(lab_images)
        feats = self.model.features(torch.cat([lab_images, strong]))
        logits = self.model.classify(feats)
        up = F.interpolate(logits, size=lab_images.shape[-2:], mode="bilinear", align_corners=False)
        sup = masked_cross_entropy(up[:nl], lab_masks, ignore)
        unsup = self.unsupervised_loss(up[nl:], pseudo, conf)

        # the contrast at feature resolution: labels and confidences nearest-downsampled
        h, w = feats.shape[-2:]
        small = lambda x: F.interpolate(x[:, None].float(), size=(h, w), mode="nearest")[:, 0]  # noqa: E731
        labels = torch.cat([small(lab_masks).long(), small(pseudo).long()])
        valid = torch.cat([labels[:nl] != ignore, (small(conf) >= cfg.weak_threshold) & (labels[nl:] != ignore)])
        mu = self.mean_head(feats).float()  # raw: prototypes are fused from raw means (reference)
        var = self.variance_head(feats)
        prob = torch.softmax(logits.detach().float(), 1)
        weight = cfg.contrast_weight * math.exp(-5 * (step / self.ctx.iterations) ** 2)
        contrast = self.contrast(mu, var, labels, valid, prob)
        loss = sup + cfg.unsup_weight * unsup + weight * contrast
        return {"loss": loss, "sup": sup.detach(), "unsup": unsup.detach(), "contrast": contrast.detach()}

    def unsupervised_loss(self, logits, pseudo, conf):
        """CE against pseudo-labels, each image weighted by its fraction of confident pixels."""
        valid = pseudo != self.ctx.ignore_index
        confident = ((conf >= self.cfg.strong_threshold) & valid).flatten(1).sum(1)
        weight = confident / valid.flatten(1).sum(1).clamp(min=1)
        loss = F.cross_entropy(logits.float(), pseudo, ignore_index=self.ctx.ignore_index, reduction="none")
        return (loss * weight[:, None, None]).sum() / valid.sum().clamp(min=1)

    def contrast(self, mu, var, labels, valid, prob):
        """Probabilistic contrast of the reference's ``Prcl_Loss``: ``mu`` are the raw means of the
        mean head. Prototypes are precision-weighted products of raw means; every mean (pixel,
        prototype, virtual negative) is L2-normalised where the reference's MLS normalises it.
        Sum over the anchor classes / number of classes present in the batch."""
        cfg, c = self.cfg, self.ctx.num_classes
        d = mu.shape[1]
        mu = mu.permute(0, 2, 3, 1).reshape(-1, d)
        var = var.permute(0, 2, 3, 1).reshape(-1, d)
        labels, valid = labels.reshape(-1), valid.reshape(-1)
        own_prob = prob.permute(0, 2, 3, 1).reshape(-1, c).gather(1, labels.clamp(max=c - 1)[:, None])[:, 0]
        idx = valid.nonzero().squeeze(1)
        mu_raw, var_v, lab_v = mu[idx], var[idx], labels[idx]
        mu_v = F.normalize(mu_raw, dim=1)
        hard = own_prob[idx] < cfg.anchor_threshold
        with torch.no_grad():
            proto_mu, proto_var, count = fuse_gaussians(mu_raw.detach(), var_v.detach(), lab_v, c)
            has_proto = count > 0
            if cfg.gdp or cfg.vn:
                g_mu, g_var, g_seen = self.update_global_prototypes(proto_mu, proto_var, has_proto)
            if cfg.gdp:
                proto_mu, proto_var, has_proto = g_mu, g_var, g_seen
            proto_mu = F.normalize(proto_mu, dim=1)
        anchor_classes, anchor_index, negative_index, _ = sample_contrast_set(
            lab_v, hard, proto_mu, proto_var, has_proto, c, cfg.num_queries, cfg.num_negatives, cfg.temperature)
        if anchor_classes.numel() == 0:
            return mu.sum() * 0.0 + var.sum() * 0.0
        pool_mu, pool_var = mu_v.detach(), var_v.detach()  # negatives carry no gradient (reference)
        losses = []
        for i, k in enumerate(anchor_classes.tolist()):
            virtual = None
            if cfg.vn:
                v_mu, v_var = virtual_negatives(g_mu, g_var, g_seen, k, cfg.num_virtual, cfg.virtual_radius)
                virtual = (F.normalize(v_mu, dim=1), v_var)
            a = anchor_index[i]
            losses.append(contrast_loss(mu_v[a], var_v[a], proto_mu[k], proto_var[k], pool_mu, pool_var,
                                        negative_index[i], cfg.temperature, virtual, backend=cfg.kernels))
        # the reference divides by every class present in the batch, anchors or not
        n_present = int((torch.bincount(lab_v, minlength=c) > 0).sum())
        return torch.stack(losses).sum() / n_present

    @torch.no_grad()
    def update_global_prototypes(self, batch_mu, batch_var, in_batch):
        """GDP: fuse each class's running Gaussian with this batch's prototype (precision-weighted
        product), so the prototype carries every iteration so far. Returns the updated prototypes."""
        prec_b = torch.where(in_batch[:, None], 1.0 / batch_var, torch.zeros_like(batch_var))
        # under torchrun every rank's batch prototype joins the product (sums over the ranks)
        weighted = distributed.all_reduce_sum(prec_b * torch.where(in_batch[:, None], batch_mu, 0.0))
        prec_b = distributed.all_reduce_sum(prec_b)
        in_batch = distributed.all_reduce_sum(in_batch.long()) > 0
        prec = self.gdp_precision + prec_b
        mu = (self.gdp_precision * self.gdp_mu + weighted) / prec.clamp(min=torch.finfo(prec.dtype).tiny)
        seen = self.gdp_seen | in_batch
        self.gdp_mu.copy_(torch.where(seen[:, None], mu, self.gdp_mu))
        self.gdp_precision.copy_(prec)
        self.gdp_seen.copy_(seen)
        var = torch.where(seen[:, None], 1.0 / prec.clamp(min=torch.finfo(prec.dtype).tiny), torch.ones_like(prec))
        return self.gdp_mu.clone(), var, seen

    def on_step_end(self, step):
        self.teacher.update(self.model, step)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Checkpoints from before ``bench.semi`` hold the teacher as a bare network (``teacher.*``);
        the ``EMATeacher`` keeps the same tensors under ``teacher.network.*``: rename, then load."""
        def moved(key: str) -> str:
            return "teacher.network" + key[len("teacher"):] if key.split(".")[0] == "teacher" else key

        if not any(k.startswith("teacher.network.") for k in state_dict):
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict((moved(k), v) for k, v in state_dict.items())
            if metadata is not None:  # per-module versions, keyed by module prefix
                state_dict._metadata = OrderedDict((moved(k), v) for k, v in metadata.items())
        return super().load_state_dict(state_dict, *args, **kwargs)

    @torch.no_grad()
    def predict(self, images):
        return (self.teacher if self.cfg.eval_network == "teacher" else self.model)(images)
