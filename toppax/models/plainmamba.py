"""PlainMamba (ChenhongyiYang/PlainMamba, L1/L2/L3 classifiers) with ToP token pruning.

Mirrors mmcls/plain_mamba_dev/models/plain_mamba/{plain_mamba.py, plain_mamba_layer.py} and
models/modules/patch_embed.py, plus the classifier around them (plain_mamba_configs/*_in1k_300e:
CustomAveragePooling neck = mean over tokens, LinearClsHead = one Linear). The official code's
quirks, which the released weights were trained with, are kept on purpose; docs/plainmamba.md
lists each one and tests/test_plainmamba.py checks each.

Pruning (docs/pruning.md): there is no cls token; kept tokens stay in raster order. The 7x7 depthwise
conv sees the kept tokens scattered back into the H x W grid (zeros elsewhere); each zig-zag scan
runs over its full-grid order restricted to the kept tokens, with the alignment gaps counted in
that order.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax.models.layers import DropPath, trunc_normal
from toppax.pruning import PruneConfig, TokenRestorer, Tokens, full_positions, prune
from toppax.pruning import ops as prune_ops
from toppax.ssm.ops import selective_scan

# Scan-step direction codes of the official get_permute_order: [start, right, left, up, down].
START, RIGHT, LEFT, UP, DOWN = range(5)
N_DIRECTIONS = 4


@dataclasses.dataclass(frozen=True)
class PlainMambaConfig:
  """Official constructor/arch names (PlainMamba.__init__, arch_zoo, layer_cfgs.mamba_cfg)."""
  img_size: int | tuple[int, int] = 224
  in_channels: int = 3
  patch_size: int = 16
  embed_dims: int = 192
  num_layers: int = 24
  num_convs_patch_embed: int = 1
  layers_with_dwconv: tuple[int, ...] = ()
  d_state: int = 16
  expand: int = 2
  conv_size: int = 7
  dt_rank: int | str = "auto"
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-5     # nn.LayerNorm default in each PlainMambaLayer
  final_norm_eps: float = 1e-6     # the backbone's norm_cfg=dict(type='LN', eps=1e-6)
  stem_channels: int = 64
  dtype: str = "float32"           # activation / matmul dtype; params, norms, scan state fp32
  scan_implementation: str | None = None

  def __post_init__(self):
    hw = _pair(self.img_size)
    object.__setattr__(self, "img_size", hw if hw[0] != hw[1] else hw[0])
    object.__setattr__(self, "layers_with_dwconv", tuple(int(i) for i in self.layers_with_dwconv))
    if self.patch_size % 2 or self.patch_size < 2:
      raise ValueError(f"patch_size must be even (the projection is a (p/2)x(p/2) conv after a "
                       f"stride-2 stem), got {self.patch_size}")
    if self.conv_size % 2 != 1:
      raise ValueError(f"conv_size must be odd, got {self.conv_size}")
    bad = [i for i in self.layers_with_dwconv if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"layers_with_dwconv {bad} outside 0..{self.num_layers - 1} (0-based)")
    grid_for(self, hw, what="img_size")

  @property
  def d_inner(self) -> int:
    return int(self.expand * self.embed_dims)

  @property
  def rank(self) -> int:
    return math.ceil(self.embed_dims / 16) if self.dt_rank == "auto" else int(self.dt_rank)

  @property
  def grid(self) -> tuple[int, int]:
    """Token grid of img_size: the shape the position embedding is stored at."""
    return grid_for(self, _pair(self.img_size))

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


def _pair(x) -> tuple[int, int]:
  if isinstance(x, (tuple, list)):
    h, w = x
    return int(h), int(w)
  return int(x), int(x)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def grid_for(cfg: PlainMambaConfig, hw: tuple[int, int], what: str = "image size"):
  """Token grid of an h x w image: the 7x7 stride-2 stem gives ceil(h / 2) x ceil(w / 2), and the
  official patch embedding pads that at the bottom and right ("corner" AdaptivePadding) to a
  multiple of the (p/2)-strided projection, so the grid is ceil(ceil(h / 2) / (p / 2)) on each
  side: h / p for sizes divisible by p, one more row or column of partly padded tokens
  otherwise (as the official model, e.g. on ADE20K test images of any width)."""
  h, w = hw
  if h < 1 or w < 1:
    raise ValueError(f"PlainMamba {what} {h}x{w} is empty")
  q = cfg.patch_size // 2
  return _ceil_div(_ceil_div(h, 2), q), _ceil_div(_ceil_div(w, 2), q)


# ------------------------------------------------------------------------------------------------
# Scan orders


@functools.lru_cache(maxsize=None)
def scan_orders(h: int, w: int):
  """The four continuous zig-zag orders of an h x w grid (official get_permute_order).

  Returns (orders, inverse, codes), each an int32 array (4, h*w): ``orders[j, k]`` is the raster
  index visited at step k of direction j; ``inverse[j, t]`` the step at which raster token t is
  visited; ``codes[j, k]`` the move that arrived at step k (START for k = 0), which indexes
  ``direction_Bs``. Directions: 0 row-wise snake from the top-left corner, 1 its reverse, 2
  column-wise snake from the top-left corner, 3 its reverse.
  """
  rows = [[(i, j) for j in (range(w) if i % 2 == 0 else reversed(range(w)))] for i in range(h)]
  cols = [[(i, j) for i in (range(h) if j % 2 == 0 else reversed(range(h)))] for j in range(w)]
  row_snake = [c for r in rows for c in r]
  col_snake = [c for r in cols for c in r]
  moves = {(0, 1): RIGHT, (0, -1): LEFT, (-1, 0): UP, (1, 0): DOWN}
  orders, codes = [], []
  for path in (row_snake, row_snake[::-1], col_snake, col_snake[::-1]):
    orders.append([i * w + j for i, j in path])
    codes.append([START] + [moves[(b[0] - a[0], b[1] - a[1])] for a, b in zip(path, path[1:])])
  orders = np.asarray(orders, np.int32)
  inverse = np.argsort(orders, axis=1).astype(np.int32)
  return orders, inverse, np.asarray(codes, np.int32)


# ------------------------------------------------------------------------------------------------
# Position embedding resizing (mmcls resize_pos_embed: torch bicubic, align_corners=False)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 weights of torch's 1-D bicubic resize (a = -0.75, align_corners=False,
  no antialias, border-clamped taps)."""
  a, scale = -0.75, n_in / n_out
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    f = math.floor(src)
    t = src - f
    for d in (-1, 0, 1, 2):
      s = abs(t - d)
      wgt = ((a + 2) * s - (a + 3)) * s * s + 1 if s <= 1 else ((s - 5) * s + 8) * s * a - 4 * a
      m[i, min(max(f + d, 0), n_in - 1)] += wgt
  return m


def resize_pos_embed(pos_embed, src: tuple[int, int], dst: tuple[int, int]):
  """(1, src_h*src_w, C) -> (1, dst_h*dst_w, C); identity when the grids match (as official)."""
  if tuple(src) == tuple(dst):
    return pos_embed
  mh = bicubic_matrix(src[0], dst[0])
  mw = bicubic_matrix(src[1], dst[1])
  c = pos_embed.shape[-1]
  grid = pos_embed.reshape(src[0], src[1], c)
  if isinstance(pos_embed, np.ndarray):
    out = np.einsum("oh,hwc,pw->opc", mh, grid.astype(np.float64), mw).astype(pos_embed.dtype)
  else:
    out = jnp.einsum("oh,hwc,pw->opc", jnp.asarray(mh, jnp.float32), grid,
                     jnp.asarray(mw, jnp.float32), precision="highest")
  return out.reshape(1, dst[0] * dst[1], c)


# ------------------------------------------------------------------------------------------------
# Layers


def _linear(din, dout, *, bias, rngs, dtype):
  # The classifier's init_cfg: TruncNormal(std=0.02, bias=0) on every nn.Linear, dt_proj included
  # (mmcv re-initialises it after PlainMamba2D's own dt init).
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=trunc_normal(0.02), bias_init=nnx.initializers.zeros, rngs=rngs)


def _conv(cin, cout, k, *, stride=1, pad=None, groups=1, bias, rngs, dtype):
  pad = k // 2 if pad is None else pad
  return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=bias,
                  dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                  bias_init=nnx.initializers.zeros, rngs=rngs)


def _batch_norm(c, *, rngs, dtype):
  # torch BatchNorm2d: eps 1e-5, momentum 0.1 (flax: 0.9); inference uses running statistics.
  return nnx.BatchNorm(c, use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(c, eps, *, rngs):
  # Two-pass variance, as torch's LayerNorm.
  return nnx.LayerNorm(c, epsilon=eps, use_fast_variance=False, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


def scatter_to_grid(x, positions, n_grid: int):
  """(batch, K, C) kept tokens -> (batch, n_grid, C) with zeros at pruned positions."""
  if positions is None:
    return x
  b = x.shape[0]
  grid = jnp.zeros((b, n_grid, x.shape[-1]), x.dtype)
  return grid.at[jnp.arange(b)[:, None], positions].set(x)


def grid_conv(conv, x, hw, positions):
  """Runs a 2-D conv over tokens: scatter to the grid, convolve, gather the kept tokens back."""
  h, w = hw
  g = scatter_to_grid(x, positions, h * w)
  g = conv(g.reshape(g.shape[0], h, w, g.shape[-1]))
  g = g.reshape(g.shape[0], h * w, g.shape[-1])
  return g if positions is None else prune_ops.take(g, positions)


class ConvPatchEmbed(nnx.Module):
  """Stem 7x7/2 conv (padding 3, no bias) + BN + ReLU, num_convs x (3x3 conv + BN + ReLU),
  then a (p/2)x(p/2) stride-(p/2) projection with bias (patch_embed.py)."""

  def __init__(self, cfg: PlainMambaConfig, *, rngs: nnx.Rngs):
    dt, c0 = jnp.dtype(cfg.dtype), cfg.stem_channels
    self.stem_conv = _conv(cfg.in_channels, c0, 7, stride=2, pad=3, bias=False, rngs=rngs,
                           dtype=dt)
    self.stem_bn = _batch_norm(c0, rngs=rngs, dtype=dt)
    self.convs = nnx.List([_conv(c0, c0, 3, bias=False, rngs=rngs, dtype=dt)
                           for _ in range(cfg.num_convs_patch_embed)])
    self.bns = nnx.List([_batch_norm(c0, rngs=rngs, dtype=dt)
                         for _ in range(cfg.num_convs_patch_embed)])
    q = cfg.patch_size // 2
    self.projection = _conv(c0, cfg.embed_dims, q, stride=q, pad=0, bias=True, rngs=rngs, dtype=dt)

  def __call__(self, x):
    x = jax.nn.relu(self.stem_bn(self.stem_conv(x)))
    for conv, bn in zip(self.convs, self.bns):
      x = jax.nn.relu(bn(conv(x)))
    q = self.projection.kernel_size[0]
    pad_h, pad_w = (-x.shape[1]) % q, (-x.shape[2]) % q
    if pad_h or pad_w:                     # the official "corner" AdaptivePadding
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    x = self.projection(x)                 # (B, H, W, C): row-major flatten == torch's flatten(2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class PlainMamba2D(nnx.Module):
  """The PlainMamba mixer: in_proj -> (x, z); 7x7 depthwise conv + SiLU on the grid; x_proj ->
  (dt, B, C); dt_proj; four zig-zag scans with direction-aware B offsets, summed; silu(z) gate;
  out_proj. Returns (out, y) with y the gated SSM output before out_proj (ToP's importance)."""

  def __init__(self, cfg: PlainMambaConfig, *, gap_delta: str = "prev", rngs: nnx.Rngs):
    d, e, n, r = cfg.embed_dims, cfg.d_inner, cfg.d_state, cfg.rank
    self.d_state, self.dt_rank = n, r
    self.dtype = jnp.dtype(cfg.dtype)
    self.scan_implementation = cfg.scan_implementation
    self.gap_delta = gap_delta
    self.in_proj = _linear(d, 2 * e, bias=True, rngs=rngs, dtype=self.dtype)
    self.conv2d = _conv(e, e, cfg.conv_size, groups=e, bias=True, rngs=rngs, dtype=self.dtype)
    self.x_proj = _linear(e, r + 2 * n, bias=False, rngs=rngs, dtype=self.dtype)
    self.dt_proj = _linear(r, e, bias=True, rngs=rngs, dtype=self.dtype)
    a = np.broadcast_to(np.log(np.arange(1, n + 1, dtype=np.float32)), (e, n))
    self.A_log = nnx.Param(jnp.array(a))
    self.D = nnx.Param(jnp.ones((e,), jnp.float32))
    self.out_proj = _linear(e, d, bias=True, rngs=rngs, dtype=self.dtype)
    # One B offset per arrival direction [start, right, left, up, down].
    self.direction_Bs = nnx.Param(trunc_normal(0.02)(rngs.params(), (N_DIRECTIONS + 1, n)))

  def _scan_inputs(self, x_conv, b, hw, positions, alignment):
    """Per direction: (u in scan order, B with direction offsets, gaps, inverse permutation)."""
    orders, inverse, codes = scan_orders(*hw)
    dir_b = self.direction_Bs[...].astype(b.dtype)
    batch = x_conv.shape[0]
    us, bs, gaps, invs = [], [], [], []
    for j in range(N_DIRECTIONS):
      if positions is None:
        order, inv = jnp.asarray(orders[j]), jnp.asarray(inverse[j])
        us.append(jnp.take(x_conv, order, axis=1))
        # Official quirk: the offset of scan step k is added to B of *raster* token k.
        bs.append(b + dir_b[jnp.asarray(codes[j])][None])
        gaps.append(None)
        invs.append(lambda y, inv=inv: jnp.take(y, inv, axis=1))
        continue
      # The full-grid order restricted to the kept tokens: sort the kept tokens by the step at
      # which the full scan visits them.
      step = jnp.asarray(inverse[j])[positions]                       # (batch, K)
      order = jnp.argsort(step, axis=1)                               # kept index per scan step
      step = jnp.take_along_axis(step, order, axis=1)
      code = jnp.asarray(codes[j])[step].at[:, 0].set(START)          # first kept step = start
      us.append(prune_ops.take(x_conv, order))
      bs.append(b + dir_b[code])
      if alignment:
        prev = jnp.concatenate([jnp.full((batch, 1), -1, step.dtype), step[:, :-1]], axis=1)
        gaps.append((step - prev - 1).astype(jnp.int32))
      else:
        gaps.append(None)
      inv = jnp.argsort(order, axis=1)
      invs.append(lambda y, inv=inv: prune_ops.take(y, inv))
    return us, bs, gaps, invs

  def __call__(self, x, hw, positions=None, *, alignment=False):
    """x: (batch, L, d) in raster order (all H*W tokens, or the kept ones at ``positions``)."""
    xz = self.in_proj(x.astype(self.dtype))
    xi, z = jnp.split(xz, 2, axis=-1)
    x_conv = jax.nn.silu(grid_conv(self.conv2d, xi, hw, positions))
    x_dbl = self.x_proj(x_conv)
    r, n = self.dt_rank, self.d_state
    dt, b, c = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    # Official quirk: dt_proj keeps its bias and the scan adds it again as delta_bias.
    dt = self.dt_proj(dt)
    us, bs, gaps, invs = self._scan_inputs(x_conv, b, hw, positions, alignment)
    # The four directions run as one scan over a 4x batch. Only u is in scan order: delta, B
    # and C stay in raster order (official quirk).
    batch = x.shape[0]
    tile = lambda t: jnp.concatenate([t] * N_DIRECTIONS, axis=0)
    gap_all = None if gaps[0] is None else jnp.concatenate(gaps, axis=0)
    ys = selective_scan(jnp.concatenate(us, axis=0), tile(dt), -jnp.exp(self.A_log[...]),
                        jnp.concatenate(bs, axis=0), tile(c), self.D[...],
                        delta_bias=self.dt_proj.bias[...], delta_softplus=True, gaps=gap_all,
                        implementation=self.scan_implementation, gap_delta=self.gap_delta)
    # Each direction carries its own D skip; summing four of them gives 4·D·u (official quirk).
    y = invs[0](ys[:batch])
    for j in range(1, N_DIRECTIONS):
      y = y + invs[j](ys[j * batch:(j + 1) * batch])
    y = y * jax.nn.silu(z)
    return self.out_proj(y), y


class PlainMambaLayer(nnx.Module):
  """x + drop_path(mixer(LayerNorm(x))), then (L1, layer 0) a 3x3 depthwise conv + BN + exact
  GELU with no residual around it (plain_mamba_layer.PlainMambaLayer)."""

  def __init__(self, cfg: PlainMambaConfig, *, drop_path: float, with_dwconv: bool,
               gap_delta: str, rngs: nnx.Rngs):
    d, dt = cfg.embed_dims, jnp.dtype(cfg.dtype)
    self.norm = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs)
    self.mamba = PlainMamba2D(cfg, gap_delta=gap_delta, rngs=rngs)
    self.drop_path = DropPath(drop_path, rngs=rngs)
    self.with_dwconv = with_dwconv
    if with_dwconv:
      self.dw_conv = _conv(d, d, 3, groups=d, bias=False, rngs=rngs, dtype=dt)
      self.dw_bn = _batch_norm(d, rngs=rngs, dtype=dt)

  def __call__(self, x, hw, positions=None, *, alignment=False):
    out, y = self.mamba(self.norm(x), hw, positions, alignment=alignment)
    x = x + self.drop_path(out).astype(x.dtype)
    if self.with_dwconv:
      conv = lambda g: self.dw_bn(self.dw_conv(g))
      x = jax.nn.gelu(grid_conv(conv, x, hw, positions), approximate=False)
    return x, y


class PlainMamba(nnx.Module):
  """PlainMamba classifier: ``model(images)`` takes NHWC float images and returns logits.

  Any height and width work (sizes not divisible by ``patch_size`` are padded as the official
  patch embedding pads them, see ``grid_for``); the position embedding (stored at the img_size
  grid) is resized bicubically to the input's grid as the official forward does. With
  ``pruning`` (a PruneConfig), tokens are pruned after the configured layers;
  ``model(images, return_info=True)`` also returns ``info`` with ``positions`` (one (B, K_i)
  array per pruning layer: the raster index of each kept token, ascending), ``scores`` (one
  (B, N_i) importance array per pruning layer) and ``tokens`` (sequence lengths).
  ``num_classes=0`` builds no classifier head; ``forward_features`` reads the layers' outputs as
  maps (the segmentation backbone).
  """

  def __init__(self, cfg: PlainMambaConfig, *, pruning: PruneConfig | None = None,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if pruning is not None:
      pruning.validate(cfg.num_layers)
      if pruning.importance == "release":
        raise ValueError("importance='release' is ToP-ViM's backward-branch score; PlainMamba "
                         "has no backward branch: use 'clip' (the paper's), 'l1', 'l2' or 'raw'")
      if pruning.fused_token:
        raise ValueError("fused_token (EViT) is not supported on PlainMamba: a fused token has no "
                         "place on the H x W grid that the depthwise conv and the zig-zag scans "
                         "need")
      pruning.token_counts(cfg.num_patches, has_cls=False)  # raises early if some K < 1
    self.cfg = cfg
    self.pruning = pruning
    d = cfg.embed_dims
    self.patch_embed = ConvPatchEmbed(cfg, rngs=rngs)
    self.pos_embed = nnx.Param(trunc_normal(0.02)(rngs.params(), (1, cfg.num_patches, d)))
    self.drop_after_pos = nnx.Dropout(cfg.drop_rate, deterministic=True, rngs=rngs)
    dpr = np.linspace(0, cfg.drop_path_rate, cfg.num_layers)
    gap_delta = pruning.gap_delta if pruning is not None else "prev"
    self.layers = nnx.List([
        PlainMambaLayer(cfg, drop_path=float(dpr[i]), with_dwconv=i in cfg.layers_with_dwconv,
                        gap_delta=gap_delta, rngs=rngs) for i in range(cfg.num_layers)])
    self.ln1 = _layer_norm(d, cfg.final_norm_eps, rngs=rngs)
    if cfg.num_classes:
      self.head = _linear(d, cfg.num_classes, bias=True, rngs=rngs, dtype=jnp.float32)

  def _grid_of(self, images) -> tuple[int, int]:
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      nchw = images.ndim == 4 and images.shape[1] == cfg.in_channels
      raise ValueError(f"expected NHWC images (batch, H, W, {cfg.in_channels}), got "
                       f"{tuple(images.shape)}"
                       + ("; they look channels-first (NCHW): transpose them with "
                          "x.transpose(0, 2, 3, 1)" if nchw else ""))
    return grid_for(cfg, (images.shape[1], images.shape[2]))

  def __call__(self, images, *, return_info: bool = False):
    if not self.cfg.num_classes:
      raise ValueError("this PlainMamba has no classifier head (num_classes=0): use "
                       "forward_features(images, taps=...)")
    tokens, info, _ = self._encode(images, taps=())
    x = self.ln1(tokens.hidden)
    logits = self.head(jnp.mean(x.astype(jnp.float32), axis=1))
    return (logits, info) if return_info else logits

  def forward_features(self, images, *, taps):
    """The outputs of layers ``taps`` (0-based) as NHWC maps (batch, H/p, W/p, dim), with no
    norm applied (PlainMamba's segmentation backbone norms them itself). When pruned, every
    position of the grid is filled: kept tokens with their own output, pruned ones with the
    output they had when they were pruned (``toppax.pruning.TokenRestorer``). Returns
    ``(maps, info)``, ``info`` as ``model(images, return_info=True)``'s."""
    taps = tuple(sorted(int(t) for t in taps))
    bad = [t for t in taps if not 0 <= t < self.cfg.num_layers]
    if bad:
      raise ValueError(f"taps {bad} outside the layers 0..{self.cfg.num_layers - 1} (0-based)")
    _, info, maps = self._encode(images, taps=taps)
    return maps, info

  def _encode(self, images, taps):
    """embed -> layers, pruned after the configured layers, read out after ``taps``.

    Returns (the tokens after the last layer run, info, maps at the taps). Without taps every
    layer runs; with taps the layers after the last one are skipped."""
    hw = self._grid_of(images)
    cfg, pr = self.cfg, self.pruning
    x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype)))
    pos = resize_pos_embed(self.pos_embed[...], cfg.grid, hw)
    x = self.drop_after_pos(x + pos.astype(x.dtype))
    batch, n_full = x.shape[0], x.shape[1]
    prune_after = dict(zip(pr.layers, pr.ratios)) if pr is not None else {}
    alignment = pr is not None and pr.alignment
    # positions None: all H*W tokens in raster order (the dense model's cheaper scan orders).
    tokens, positions = Tokens(x, None, full_positions(batch, n_full)), None
    info = {"positions": [], "scores": [], "tokens": [n_full]}
    restorer = TokenRestorer() if taps else None
    maps = []
    end = taps[-1] + 1 if taps else cfg.num_layers
    for i in range(end):
      x, y = self.layers[i](tokens.hidden, hw, positions, alignment=alignment)
      tokens = tokens._replace(hidden=x)
      if i in taps:
        full = restorer.read(tokens)
        maps.append(full.reshape(batch, *hw, full.shape[-1]))
      if i + 1 in prune_after:
        # One summed output: (y + y) / 2 == y exactly. The 1-D gaps are not used: each zig-zag
        # scan counts its own gaps from the positions (PlainMamba2D).
        tokens, step = prune(tokens, (y, y), prune_after[i + 1], pr, n_full=n_full,
                             restorer=restorer)
        if tokens.hidden.shape[1] < n_full:
          positions = tokens.positions
        info["positions"].append(step.positions)
        info["scores"].append(step.scores)
        info["tokens"].append(tokens.hidden.shape[1])
    return tokens, info, maps


VARIANTS = {
    "plainmamba_l1": dict(embed_dims=192, num_layers=24, num_convs_patch_embed=1,
                          layers_with_dwconv=(0,)),
    "plainmamba_l2": dict(embed_dims=384, num_layers=24, num_convs_patch_embed=2,
                          layers_with_dwconv=()),
    "plainmamba_l3": dict(embed_dims=448, num_layers=36, num_convs_patch_embed=2,
                          layers_with_dwconv=()),
}
# Training drop-path rates of plain_mamba_configs/plain_mamba_l*_in1k_300e.py (inactive in eval).
TRAIN_DROP_PATH = {"plainmamba_l1": 0.2, "plainmamba_l2": 0.2, "plainmamba_l3": 0.4}


def config_for(variant: str, **overrides) -> PlainMambaConfig:
  if variant not in VARIANTS:
    raise ValueError(f"unknown PlainMamba variant {variant!r}; available: {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(PlainMambaConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown PlainMamba override(s) {unknown}; valid: {sorted(fields)}")
  return PlainMambaConfig(**{**VARIANTS[variant], **overrides})


def create(variant: str, *, pruning: PruneConfig | None = None, rngs: nnx.Rngs | None = None,
           **overrides) -> PlainMamba:
  """``plainmamba_l1`` / ``_l2`` / ``_l3`` with official-name overrides (img_size, patch_size,
  embed_dims, num_layers, num_convs_patch_embed, layers_with_dwconv, d_state, expand,
  conv_size, num_classes, ...)."""
  return PlainMamba(config_for(variant, **overrides), pruning=pruning, rngs=rngs)
