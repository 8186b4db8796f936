"""Embedding and output-projection pass: the token embedding table and the lm_head in integers.

Pattern (from the graph, not from names):

* **token embedding** -- ``aten.embedding(weight, ids)`` whose ids are the graph's first input (the
  token ids); a learned position embedding reads positions and is left alone;
* **output projection** -- the Linear whose output is the graph's (first) output, through views,
  casts and a logit softcap (``tanh``, ``mul``, ``div``).

Rewrite: the weight becomes ``llmq.dequantize_weight(codes, scale, bits)`` of symmetric integer codes,
one scale per group of columns of a row (``WeightSpec``, round-to-nearest with the clipping search),
the same nodes every quantized Linear reads (``insert_weight_dequant``). The configured group size is
an upper bound: the largest power of two up to it (at least 16) that divides the row is used, else
one scale per row. The lm_head's
input stays float (weight-only, as in onnxruntime-genai's int4 models) at 4 bits; at 8 bits it is
quantized to int8 per group, what onnxruntime's fast 8-bit kernel does to it (``_int8_kernel_input``). The exporter writes the embedding as
``com.microsoft.GatherBlockQuantized`` and the lm_head as ``MatMulNBits`` (the ``fast`` format), or as
``DequantizeLinear`` + ``Gather``/``MatMul`` (``qdq``).

Why: after rotation the embedding and the lm_head are two float tables of ``vocab x hidden`` (the
rotation unties them), which are most of a small model's file (SmolLM2-135M: 2 x 108 MiB of 273).
A table the model ties to its lm_head and the rotation left tied (``RotateOptions.keep_tied``, set
when both are quantized alike) is quantized once and read by both, as onnxruntime-genai's builder
shares one int4 table between ``GatherBlockQuantized`` and ``MatMulNBits``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)
from llmq_fx import qmath
from llmq_fx.errors import ConfigError
from llmq_fx.graph import VIEW_OPS, attr, compute_device, is_linear, module_path, read_attr, record_outputs, storage_key
from llmq_fx.passes.base import CalibratedPass
from llmq_fx.passes.insert_qdq import delete_replaced_weights, insert_weight_dequant, is_integer_weight
from llmq_fx.spec import ActivationSpec, WeightSpec

__all__ = ["QuantizeEmbeddingsPass", "EmbeddingsOptions", "token_embeddings", "output_projection"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
# Between the lm_head and the logits output: views, casts and a logit softcap (cap * tanh(x / cap)).
_TO_OUTPUT = VIEW_OPS | {aten.to.dtype, aten._to_copy.default, aten.tanh.default, aten.mul.Tensor, aten.div.Tensor}


@dataclass(frozen=True)
class EmbeddingsOptions:
    """Options of ``QuantizeEmbeddingsPass``: the scheme of the token embedding and of the lm_head
    weight (None leaves it float); ``lm_head_gptq``: round the lm_head (and a table tied to it) with
    GPTQ on its input's Hessian over the calibration batches (``damp``) instead of to nearest."""

    embedding: WeightSpec | None = None
    lm_head: WeightSpec | None = None
    lm_head_gptq: bool = False
    damp: float = 0.01


def _int8_kernel_input(gm: fx.GraphModule, head: fx.Node, group: int | None) -> ActivationSpec:
    """Make an 8-bit lm_head read its input as onnxruntime's fast 8-bit kernel does.

    ``MatMulNBits`` has a fast 8-bit kernel only at ``accuracy_level`` 4, which quantizes its input to
    int8 per block of the weight's group (symmetric, scale = absmax / 127) and multiplies in integers
    (at levels 0-2 it runs a slow fallback: 76 ms per token for SmolLM2's 49152 x 576 lm_head on this
    CPU, against 0.2 ms). The graph quantizes the lm_head input the same way, so PyTorch computes what
    onnxruntime runs; the exporter hands that quantization to the kernel (``onnx_export``).
    """
    spec = ActivationSpec(bits=8, symmetric=True, dynamic=True, group_size=group or 0, clip_ratio=1.0)
    x = head.args[0]
    with gm.graph.inserting_before(head):
        qdq = gm.graph.call_function(torch.ops.llmq.quantize_dequantize_dynamic.default, (x, *spec.op_args()))
    for key in ("val", "nn_module_stack"):
        if key in x.meta:
            qdq.meta[key] = x.meta[key]
    head.replace_input_with(x, qdq)
    return spec


def _group_for(columns: int, group_size: int | None) -> int | None:
    """The group size used for a table of ``columns`` columns: ``group_size`` is an upper bound, and
    the largest power of two up to it (at least 16, what GatherBlockQuantized/MatMulNBits take) that
    divides the row is used; None (one scale per row) when none does."""
    if group_size is None:
        return None
    g = 1 << (group_size.bit_length() - 1)
    while g >= 16 and columns % g:
        g //= 2
    return g if g >= 16 else None


def token_embeddings(gm: fx.GraphModule) -> list[fx.Node]:
    """``aten.embedding`` nodes that look up the graph's token ids (its first input) in a parameter."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return []
    ids = placeholders[0]

    def from_ids(node) -> bool:  # the token ids, through views (OPT flattens them to [-1, seq])
        while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
            node = node.args[0]
        return node is ids

    return [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target == aten.embedding.default and from_ids(n.args[1])
        and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"
    ]


def output_projection(gm: fx.GraphModule) -> fx.Node | None:
    """The Linear whose output is the graph's first output (the logits), or None."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    while isinstance(node, (tuple, list)):
        node = node[0]
    while isinstance(node, fx.Node) and not is_linear(node):
        if node.op != "call_function" or node.target not in _TO_OUTPUT:
            return None
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return node


class QuantizeEmbeddingsPass(CalibratedPass):
    """Quantize the token embedding table and/or the lm_head weight (weight-only)."""

    Options = EmbeddingsOptions
    stage = "embeddings"

    @classmethod
    def from_config(cls, config) -> "QuantizeEmbeddingsPass | None":
        embed, head = config.embedding_spec(), config.lm_head_spec()
        if embed is None and head is None:
            return None
        return cls(EmbeddingsOptions(embed, head, lm_head_gptq=bool(config.lm_head_gptq and head), damp=config.gptq_damp))

    def call(self, gm: fx.GraphModule) -> PassResult:
        record = gm.meta.setdefault("llmq_fx", {}).setdefault("embeddings", {})
        opts = self.options
        modified = False
        head = output_projection(gm) if opts.lm_head is not None else None
        hessian = None  # of the lm_head's input, for GPTQ; keyed by the storage of the weight it rounds
        if opts.lm_head_gptq and head is not None and not is_integer_weight(head.args[1]):
            hessian = (storage_key(attr(gm, head.args[1].target)), self._input_hessian(gm, head))
        tables = {}  # storage of each quantized token table -> its dequantize node and path
        if opts.embedding is not None:
            nodes = token_embeddings(gm)
            if not nodes:
                logger.warning("embed_bits: no token embedding found in the graph; left as it is")
            for node in nodes:
                table = storage_key(attr(gm, node.args[0].target))
                # A table tied to the lm_head and rounded for it: GPTQ on the lm_head's input, if asked.
                h = hessian[1] if hessian is not None and hessian[0] == table and opts.embedding == opts.lm_head else None
                record[module_path(node)] = self._quantize(gm, node, 0, opts.embedding, "embedding", h)
                tables[table] = (node.args[0], module_path(node))
                modified = True
        if opts.lm_head is not None:
            if head is None:
                logger.warning("lm_head_bits: no Linear produces the logits; left as it is")
            elif is_integer_weight(head.args[1]):
                # Not in 'skip': InsertQDQPass quantized it as the other Linears (weights and input).
                logger.warning("lm_head_bits=%d: %s is quantized already (it is not in 'skip'); left as it is",
                               opts.lm_head.bits, module_path(head))
            else:
                path = module_path(head)
                w = head.args[1]
                shared = tables.get(storage_key(attr(gm, w.target))) if w.op == "get_attr" else None
                if shared is not None and opts.lm_head == opts.embedding:
                    # Tied and quantized alike: the lm_head reads the embedding's codes (one table in the file).
                    deq, emb_path = shared
                    head.replace_input_with(w, deq)
                    record[path] = {**record[emb_path], "kind": "lm_head", "tied_to": emb_path}
                else:
                    record[path] = self._quantize(gm, head, 1, opts.lm_head, "lm_head", hessian and hessian[1])
                a_bits = None
                if opts.lm_head.bits == 8:
                    record[path]["input"] = str(_int8_kernel_input(gm, head, record[path]["group_size"]))
                    a_bits = 8
                linears = gm.meta["llmq_fx"].setdefault("linears", {})
                linears.setdefault(path, {}).update(w_bits=opts.lm_head.bits, w_group_size=record[path]["group_size"],
                                                    a_bits=a_bits)
                modified = True
        gm.graph.eliminate_dead_code()
        delete_replaced_weights(gm)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    @torch.no_grad()
    def _input_hessian(self, gm: fx.GraphModule, head: fx.Node) -> torch.Tensor:
        """``X^T X / tokens`` (float64) of the lm_head's input over the calibration batches, on the graph as
        quantized so far (GPTQ's sequential order: the head is rounded for the inputs it will get): one
        forward of the whole graph per batch, where its weights are."""
        device = compute_device(gm)
        elsewhere = next((name for name, t in list(gm.named_parameters()) + list(gm.named_buffers())
                          if t.device != device), None)
        if elsewhere is not None:
            raise ConfigError(
                f"lm_head_gptq runs the whole graph on the calibration batches, but {elsewhere} is on "
                f"{attr(gm, elsewhere).device}, not {device} where the passes compute (quantize(..., device=) on a "
                "graph kept elsewhere walks it layer by layer): set lm_head_gptq to false")

        acc = {"h": None, "n": 0}

        def add(x: torch.Tensor) -> None:
            z = x.reshape(-1, x.shape[-1]).to(torch.float64)
            if acc["h"] is None:
                acc["h"] = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64, device=z.device)
            qmath.add_gram_(acc["h"], z, z)
            acc["n"] += z.shape[0]

        record_outputs(gm, self._require_batches(), {head.args[0]: add})
        return acc["h"] / max(acc["n"], 1)

    @torch.no_grad()
    def _quantize(self, gm: fx.GraphModule, node: fx.Node, index: int, spec: WeightSpec, kind: str,
                  hessian: torch.Tensor | None = None) -> dict:
        w_node = node.args[index]
        path = module_path(node)
        weight = read_attr(gm, w_node.target)  # the clip search runs where the passes compute
        spec = dataclasses.replace(spec, group_size=_group_for(weight.shape[1], spec.group_size))
        if hessian is not None:
            qweight, scale = qmath.gptq_quantize_weight(weight.float(), hessian.to(weight.device, torch.float32),
                                                        spec.bits, spec.group_size, act_order=True,
                                                        damp=self.options.damp, clip=spec.clip)
        else:
            qweight, scale = spec.quantize(weight)
        deq = insert_weight_dequant(gm, node, path, qweight, scale, spec.bits, index=index)
        err = (qmath.dequantize_weight(qweight, scale) - weight).square().sum() / weight.square().sum()
        return {"kind": kind, "bits": spec.bits, "group_size": spec.group_size, "gptq": hessian is not None,
                "shape": list(weight.shape),
                "relative_error": float(err), "node": deq.name}
