"""``QuantConfig``: what to quantize and how, loadable from a dict, YAML or TOML file."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmq_fx.errors import ConfigError

__all__ = ["QuantConfig", "SITE_ROLES"]

# The roles a Linear input (an activation site) can play; the graph decides a site's role by
# pattern (see ``llmq_fx.graph.site_role``). ``other`` covers lm_head and OPT-350m's projections.
SITE_ROLES = ("qkv", "out_proj", "fc1", "fc2", "other")
_SMOOTHABLE = ("qkv", "fc1", "fc2", "out_proj")
_FEATURES = ("minmax", "maxstd")
CALIB_PRECISIONS = ("float32", "tf32")
CALIB_DTYPES = ("float32", "bfloat16")


@dataclass
class QuantConfig:
    """Configuration of ``llmq_fx.quantize``.

    Attributes:
        w_bits: weight bits (2..8), or None to leave weights in float.
        a_bits: activation bits (2..8), or None to leave activations in float.
        w_group_size: None for one scale per output channel, else input channels per group.
        a_symmetric: symmetric (signed, zero point 0) activation codes instead of asymmetric.
        a_dynamic: per-token dynamic activation ranges (computed at run time from each token)
            instead of static per-cluster ranges from calibration; clustering is then not used.
        smooth_alpha: SmoothQuant migration strength in (0, 1], or None for no smoothing.
        smooth_sites: which sites to smooth, by role: ``qkv`` and ``fc1`` fold into the preceding
            norm, ``fc2`` into fc1's output rows (ReLU), ``out_proj`` into v_proj's output rows.
        n_clusters: activation clusters per site, an int or a dict by role (1 = per tensor).
        cluster_features: ``minmax`` (RPTQ) or ``maxstd`` (absmax, std) k-means features.
        a_group_size: with ``a_dynamic``, channels per dynamic range: each token of a site wider than
            this, and divisible by it, is split into groups of that many consecutive channels, each
            with its own scale/zero point; other sites (narrower, or not divisible: a warning) keep
            one range per token, as every site does with None. Static activations are grouped by
            ``n_clusters`` instead and ignore it.
        a_clip_ratio: factor in (0, 1] applied to every activation range (static cluster min/max or
            dynamic per-token min/max) before its scale is computed; values beyond saturate.
        w_clip: search each weight row's (group's) clipping ratio minimizing its rounding error
            instead of using its absmax (RTN and GPTQ alike).
        a_outlier_bits: bits of the outlier clusters (mixed precision), or None for all at ``a_bits``.
        a_outlier_clusters: how many clusters (widest range first) get ``a_outlier_bits``.
        rotate: fuse a seeded random Hadamard rotation of the residual stream (QuaRot) into the
            weights, with online Hadamard nodes before fc2/down_proj (``RotatePass``). ``"auto"``
            rotates where the graph allows it (pre-norm blocks) and otherwise goes on unrotated
            with a warning (OPT-350m's post-LayerNorm); ``true`` makes that an error.
        sort_residual: order the rotated residual channels (one permutation for the whole model, folded
            into the rotation ``Q -> Q P``: no node added), so each group of ``a_group_size`` channels at
            the norm outputs holds channels of similar range (RPTQ's reordering in the rotated basis;
            ``RotatePass`` with ``channel_order.ResidualOrder``). ``true`` or ``"range"`` sorts by range;
            ``"kmeans"`` makes each group one balanced k-means cluster of channels. Only with the rotation
            and dynamic activation groups (elsewhere the order changes nothing and it is not computed).
        learn_rotation_steps: train one more orthogonal rotation of the residual stream for this many
            steps on the W4A4 model's loss and fold it in (``LearnRotationPass``, SpinQuant's R1), or
            None. ``learn_rotation_lr``: its Adam learning rate.
        gptq: GPTQ weight quantization (error compensation with the calibration Hessian) instead of
            round-to-nearest; ``gptq_act_order``, ``gptq_damp`` (fraction of the mean Hessian
            diagonal added) and ``gptq_block_size`` (columns per lazy batch) as in the GPTQ paper.
        gptq_act_aware: with GPTQ and per-token dynamic activations, the strength in [0, 1] with which
            GPTQ compensates the activations' quantization: the observers quantize each calibration
            input as the deployed model will, and GPTQ minimizes ``s * ||X W^T - Q(X) Wq^T||^2 +
            (1 - s) * ||Q(X) W^T - Q(X) Wq^T||^2`` (``qmath.input_aware_weight``); None = plain
            GPTQ on ``X``. Static activations or smoothing (ranges or scales only known after
            calibration) fall back to plain GPTQ with a warning.
        gptq_sequential: with activation-aware GPTQ, calibrate and quantize site by site in one
            walk over the graph (``SequentialGPTQPass``): each site's Linears are rounded on the
            inputs of the model quantized up to there, and fitted (with strength ``gptq_act_aware``)
            to the float model's output. Two float forwards over the calibration set instead of one,
            all batches' activations held at once. Where act-aware GPTQ does not apply, one-pass
            GPTQ runs (``meta["gptq_sequential"]`` is then false).
        a_clip_search: with sequential GPTQ, candidate activation clip ratios: each site takes the one
            minimizing its Linears' output error from activation quantization, on the quantized
            model's inputs (``SequentialGPTQPass``), instead of ``a_clip_ratio``; None = no search.
        a_clip_search_tokens: the search's errors are summed over the first calibration batches
            holding at least this many tokens (a choice among a few ratios, made as well on 32768
            tokens as on more: the search costs a product per candidate per token); None = all batches.
        embed_bits / embed_group_size: the token embedding table as integer codes of this many bits,
            one scale per ``embed_group_size`` columns of a row (None: float). Exported as
            ``GatherBlockQuantized`` (``QuantizeEmbeddingsPass``).
        lm_head_bits / lm_head_group_size: the lm_head weight likewise (weight-only: its input stays
            float), exported as ``MatMulNBits``. The lm_head stays in ``skip`` for activations. When
            both tables have the same scheme and the model ties them, the rotation keeps them tied
            and one table is stored (``RotateOptions.keep_tied``).
        lm_head_gptq: round the lm_head weight (and a table tied to it) with GPTQ on its input's
            Hessian, from one more forward of the quantized graph over the calibration batches,
            instead of to nearest.
        skip: module-path patterns (fnmatch) of Linears left entirely in float.
        seed / kmeans_n_init: k-means determinism.
        calib_batch_size: sequences per calibration forward.
        calib_precision: matrix products of the calibration forwards and statistics on CUDA:
            "float32", or "tf32" (TensorFloat-32 inputs, float32 accumulation). With "tf32" the
            sequential walk's Hessians are TF32 products too, each checked: one whose damped form has
            no Cholesky factor is recomputed in float32 (``qmath.damped_hessian_factor``). GPTQ's own math
            stays as it is either way: the damped Hessian's Cholesky factor and GPTQ's inverse factor in
            float64, the column loop and the act-aware target's products in float32/float64. On the CPU
            there is no TF32 and both compute in float32.
        calib_dtype: the dtype the sequential GPTQ walk carries its two lanes of activations in:
            "float32", or "bfloat16" (CUDA only: half the activation memory; weights are cast as
            they are used, GPTQ's moments and math stay float32).
        calib_cache_gib: the most GiB of calibration activations the sequential GPTQ walk keeps
            across batches; where a site's inputs over all batches would not fit, they are
            recomputed from the last point that did (same result, more compute). null: no cap on
            the CPU, a fifth of the device's memory on CUDA.
    """

    w_bits: int | None = 4
    a_bits: int | None = 4
    w_group_size: int | None = 64
    a_symmetric: bool = False
    a_dynamic: bool = True
    smooth_alpha: float | None = None
    smooth_sites: list[str] = field(default_factory=lambda: ["qkv", "fc1", "fc2", "out_proj"])
    n_clusters: int | dict[str, int] = 8
    cluster_features: str = "minmax"
    a_group_size: int | None = 32
    a_clip_ratio: float = 0.9
    w_clip: bool = True
    a_outlier_bits: int | None = None
    a_outlier_clusters: int = 1
    rotate: bool | str = "auto"
    sort_residual: bool | str = "range"
    learn_rotation_steps: int | None = None
    learn_rotation_lr: float = 1e-3
    gptq: bool = True
    gptq_act_order: bool = True
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_aware: float | None = 0.3
    gptq_sequential: bool = True
    a_clip_search: list[float] | None = field(default_factory=lambda: [0.8, 0.85, 0.9, 0.95, 1.0])
    a_clip_search_tokens: int | None = 32768
    embed_bits: int | None = 4
    embed_group_size: int | None = 32
    lm_head_bits: int | None = 8
    lm_head_group_size: int | None = 64
    lm_head_gptq: bool = False
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    seed: int = 0
    kmeans_n_init: int = 4
    calib_batch_size: int = 4
    calib_precision: str = "tf32"
    calib_dtype: str = "float32"
    calib_cache_gib: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("w_bits", "a_bits", "a_outlier_bits", "embed_bits", "lm_head_bits"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 8):
                raise ConfigError(f"config key {key!r} must be an integer in 2..8 or null, got {v!r}")
        for key in ("w_group_size", "embed_group_size", "lm_head_group_size"):
            g = getattr(self, key)
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
                raise ConfigError(f"config key {key!r} must be a positive integer or null, got {g!r}")
        a = self.smooth_alpha
        if a is not None and (not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 < a <= 1):
            raise ConfigError(f"config key 'smooth_alpha' must be in (0, 1] or null, got {a!r}")
        if not isinstance(self.smooth_sites, (list, tuple)):
            raise ConfigError(f"config key 'smooth_sites' must be a list, got {self.smooth_sites!r}")
        for s in self.smooth_sites:
            if s not in _SMOOTHABLE:
                raise ConfigError(f"config key 'smooth_sites' has unknown site {s!r}; choose from {_SMOOTHABLE}")
        nc = self.n_clusters
        items = nc.items() if isinstance(nc, dict) else [("n_clusters", nc)]
        for k, v in items:
            if isinstance(nc, dict) and k not in SITE_ROLES:
                raise ConfigError(f"config key 'n_clusters.{k}' is not a site role; choose from {SITE_ROLES}")
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config key 'n_clusters' must be a positive integer, got {k}={v!r}")
        if self.cluster_features not in _FEATURES:
            raise ConfigError(f"config key 'cluster_features' must be one of {_FEATURES}, got {self.cluster_features!r}")
        if not isinstance(self.skip, (list, tuple)) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigError(f"config key 'skip' must be a list of module-name patterns, got {self.skip!r}")
        ag = self.a_group_size
        if ag is not None and (not isinstance(ag, int) or isinstance(ag, bool) or ag < 1):
            raise ConfigError(f"config key 'a_group_size' must be a positive integer or null, got {ag!r}")
        cs = self.a_clip_search
        if cs is not None and (
            not isinstance(cs, (list, tuple)) or not cs
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in cs)
        ):
            raise ConfigError(f"config key 'a_clip_search' must be a non-empty list of ratios in (0, 1] or null, got {cs!r}")
        ct = self.a_clip_search_tokens
        if ct is not None and (not isinstance(ct, int) or isinstance(ct, bool) or ct < 1):
            raise ConfigError(f"config key 'a_clip_search_tokens' must be a positive integer or null, got {ct!r}")
        c = self.a_clip_ratio
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not 0 < c <= 1:
            raise ConfigError(f"config key 'a_clip_ratio' must be in (0, 1], got {c!r}")
        if not (isinstance(self.sort_residual, bool) or self.sort_residual in ("range", "kmeans")):
            raise ConfigError(f"config key 'sort_residual' must be true, false, \"range\" or \"kmeans\", got {self.sort_residual!r}")
        if self.sort_residual == "kmeans" and not (self.a_dynamic and self.a_group_size):
            raise ConfigError("config key 'sort_residual': \"kmeans\" makes the clusters the dynamic activation groups: "
                              "it needs 'a_dynamic' and an 'a_group_size'")
        if not (isinstance(self.rotate, bool) or self.rotate == "auto"):
            raise ConfigError(f"config key 'rotate' must be true, false or \"auto\", got {self.rotate!r}")
        for key in ("a_symmetric", "a_dynamic", "gptq", "gptq_act_order", "w_clip", "gptq_sequential", "lm_head_gptq"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"config key {key!r} must be true or false, got {getattr(self, key)!r}")
        aa = self.gptq_act_aware
        if aa is not None and (not isinstance(aa, (int, float)) or isinstance(aa, bool) or not 0 <= aa <= 1):
            raise ConfigError(f"config key 'gptq_act_aware' must be in [0, 1] or null, got {aa!r}")
        d = self.gptq_damp
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 <= d < 1:
            raise ConfigError(f"config key 'gptq_damp' must be in [0, 1), got {d!r}")
        for key in ("kmeans_n_init", "calib_batch_size", "a_outlier_clusters", "gptq_block_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"config key {key!r} must be a positive integer, got {v!r}")
        if self.calib_precision not in CALIB_PRECISIONS:
            raise ConfigError(f"config key 'calib_precision' must be one of {list(CALIB_PRECISIONS)}, got {self.calib_precision!r}")
        if self.calib_cache_gib is not None and (
                isinstance(self.calib_cache_gib, bool) or not isinstance(self.calib_cache_gib, (int, float))
                or not self.calib_cache_gib >= 0):
            raise ConfigError(f"config key 'calib_cache_gib' must be a number of GiB >= 0 or null, got {self.calib_cache_gib!r}")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ConfigError(f"config key 'calib_dtype' must be one of {list(CALIB_DTYPES)}, got {self.calib_dtype!r}")
        if self.calib_dtype != "float32" and not self.runs_sequential_gptq():
            raise ConfigError(
                f"config key 'calib_dtype'={self.calib_dtype!r} applies to the sequential GPTQ walk, which this config "
                "does not run (it calibrates in float32): set calib_dtype to 'float32'"
            )
        if self.a_outlier_bits is not None and self.a_bits is None:
            raise ConfigError("config key 'a_outlier_bits' needs quantized activations; 'a_bits' is null")
        if self.a_outlier_bits is not None and self.a_dynamic:
            raise ConfigError(
                "config keys 'a_outlier_bits' and 'a_dynamic' cannot be combined: mixed precision promotes "
                "static clusters, and per-token dynamic ranges have none"
            )

    def act_aware_unavailable(self) -> str | None:
        """Why ``gptq_act_aware`` cannot apply to this config (plain GPTQ then runs), or None when it applies.

        The observers can only quantize calibration inputs as the deployed model will when that
        quantizer is fixed before calibration: dynamic ranges, and no smoothing (its scales come
        from the statistics afterwards and change the quantizer's input).
        """
        if self.gptq_act_aware is None or not self.gptq or self.w_bits is None:
            return "GPTQ is off or not activation-aware"
        if self.a_bits is None:
            return "activations are not quantized (a_bits is null)"
        if not self.a_dynamic:
            return "static activation ranges are only known after calibration (a_dynamic is false)"
        if self.smooth_alpha is not None and self.smooth_sites:
            return "smoothing rescales the activations after calibration (smooth_alpha is set)"
        return None

    def runs_sequential_gptq(self) -> bool:
        """Whether ``quantize`` runs ``SequentialGPTQPass``: asked for, and act-aware GPTQ applies."""
        return self.gptq_sequential and self.act_aware_unavailable() is None

    def weight_spec(self) -> "WeightSpec | None":
        """The weight scheme this config asks for (None: weights stay float)."""
        from llmq_fx.spec import WeightSpec

        return None if self.w_bits is None else WeightSpec(self.w_bits, self.w_group_size, self.w_clip)

    def residual_order(self) -> "ResidualOrder | None":
        """How ``RotatePass`` orders the rotated residual channels (``sort_residual``), or None: not asked,
        no rotation, or nothing to order for (one range per token, static clusters: the order does not
        change them)."""
        from llmq_fx.channel_order import ResidualOrder

        if not self.sort_residual or not self.rotate or not (self.a_dynamic and self.a_group_size):
            return None
        method = "range" if self.sort_residual is True else self.sort_residual
        return ResidualOrder(method, self.a_group_size, seed=self.seed, n_init=self.kmeans_n_init)

    def embedding_spec(self) -> "WeightSpec | None":
        """The token embedding table's scheme (None: float), clip search on."""
        from llmq_fx.spec import WeightSpec

        return WeightSpec(self.embed_bits, self.embed_group_size, clip=True) if self.embed_bits else None

    def lm_head_spec(self) -> "WeightSpec | None":
        """The lm_head weight's scheme (None: float), clip search on. Equal to ``embedding_spec()``: the two
        tables can be one (``RotateOptions.keep_tied``)."""
        from llmq_fx.spec import WeightSpec

        return WeightSpec(self.lm_head_bits, self.lm_head_group_size, clip=True) if self.lm_head_bits else None

    def activation_spec(self) -> "ActivationSpec | None":
        """The activation scheme this config asks for (None: activations stay float). For dynamic
        activations ``group_size`` is the upper bound ``a_group_size`` (``ActivationSpec.for_site``)."""
        from llmq_fx.spec import ActivationSpec

        if self.a_bits is None:
            return None
        return ActivationSpec(self.a_bits, self.a_symmetric, self.a_dynamic,
                              (self.a_group_size or 0) if self.a_dynamic else 0, float(self.a_clip_ratio))

    @classmethod
    def coerce(cls, config: "QuantConfig | dict | None") -> "QuantConfig":
        """``config`` as a ``QuantConfig``: None is the default recipe, a dict is read with ``from_dict``."""
        if config is None:
            return cls()
        if isinstance(config, dict):
            return cls.from_dict(config)
        if not isinstance(config, cls):
            raise ConfigError(f"a config must be a QuantConfig, a dict or None, got {type(config).__name__}")
        return config

    def clusters_for(self, role: str) -> int:
        if isinstance(self.n_clusters, dict):
            return self.n_clusters.get(role, 1)
        return self.n_clusters

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "QuantConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                data = yaml.safe_load(text) or {}
        except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot parse config file {path}: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
