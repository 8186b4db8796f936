"""Export a captured (float or quantized) GraphModule to ONNX.

``to_onnx`` runs the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with the llmq ops
translated by ``llmq_fx.export.translation``, then rewrites the ONNX graph so that every quantized
weight is stored as an integer initializer (INT4 packed two values a byte, as ONNX stores it) read
directly by ``DequantizeLinear``. The exporter itself would keep the int8 buffer and a
``Cast(to=INT4)``, and its constant folder only folds small tensors, so the fold is done here, for
every size, before the ONNX optimizer runs. Two formats:

* ``fast`` (default): every ``DequantizeLinear(weight) -> Transpose -> MatMul (-> Add bias)`` becomes
  one ``com.microsoft.MatMulNBits`` holding the same integer codes (shifted to unsigned, the op's
  default zero point ``2^(bits-1)`` undoing the shift) packed as the op expects, and the same scales
  (a per-output-channel scale repeated over the blocks of a row): onnxruntime stores and multiplies
  the weights in 4 bits. MatMulNBits reading one input (q/k/v, gate/up) are packed into one along
  ``N`` and split after (``PACKED_META`` names the weights a packed node holds). Activations are
  fake-quantized with float ops (``translation``).
* ``qdq``: standard ops only (``QuantizeLinear``/``DequantizeLinear`` with INT4/UINT4 tensors), for
  tools that read no contrib ops.

A graph from ``capture.trace_decoder`` (or ``export.decoder.quantized_decoder``) exports with its
KV-cache interface: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value``; outputs ``logits``, ``present.{i}.key/value``, every batch,
sequence and past-length dim dynamic.

The file is written to a temporary folder next to the target, checked with
``onnx.checker.check_model(full_check=True)``, then renamed into place: a failed export leaves
no model and no external-data file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
from torch import fx
from torch.export import Dim

from llmq_fx.errors import ExportError
from llmq_fx.export.translation import FAST_TRANSLATION_TABLE, TRANSLATION_TABLE
from llmq_fx.passes.insert_qdq import WEIGHT_META

__all__ = ["to_onnx", "EXTERNAL_DATA_THRESHOLD_BYTES", "FORMATS", "PACKED_META", "nbits_block_size"]

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GiB; stay clear of it (graph + metadata need room too).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

# INT4/UINT4 types and blocked (block_size) DequantizeLinear need opset 21.
_MIN_OPSET = 21
FORMATS = ("fast", "qdq")
_FOLD_LIMIT = 65536
# MatMulNBits block sizes, largest first (powers of two >= 16): a per-channel row takes the largest
# that divides it. 128 and 64 ran faster than 32 on this CPU (576 x 1536, 512 rows: 4.5 ms at 64, 6.3 at 32).
_NBITS_BLOCKS = (256, 128, 64, 32, 16)

_QDQ_OP_TYPES = ("QuantizeLinear", "DequantizeLinear")
# Integer range of each QDQ element type: a value outside it would silently wrap when packed.
_TYPE_RANGES = {
    ir.DataType.INT4: (-8, 7),
    ir.DataType.UINT4: (0, 15),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
}


def to_onnx(
    gm: fx.GraphModule,
    path: str | os.PathLike,
    opset: int = 21,
    example_input_ids: torch.Tensor | None = None,
    external_data: bool | None = None,
    format: str = "fast",
    accuracy_level: int = 4,
) -> Path:
    """Export ``gm`` to an ONNX file.

    Args:
        gm: the output of ``llmq_fx.trace`` or ``llmq_fx.quantize`` (``input_ids -> logits``), or a
            KV-cache decoder (``export.decoder.quantized_decoder``, ``capture.trace_decoder``).
        path: the ``.onnx`` file to write; its folder must exist.
        opset: ONNX opset, at least 21 (INT4/UINT4 in QuantizeLinear/DequantizeLinear).
        example_input_ids: ids used to trace a logits-only export; by default zeros ``[2, 8]``.
            Batch and sequence stay dynamic whatever is passed.
        external_data: store initializers in ``<path>.data``; by default only when the weights
            are too big for one protobuf (about 2 GB).
        format: ``fast`` (MatMulNBits weights, float fake-quantized activations) or ``qdq``
            (standard QuantizeLinear/DequantizeLinear only); see the module docstring.
        accuracy_level: MatMulNBits' ``accuracy_level`` in the ``fast`` format (0: float math on the
            dequantized weights; 4: the kernel quantizes its input to int8 per block and multiplies
            in integers).

    Returns:
        The path of the written model: input ``input_ids`` (int64 ``[batch, seq]``), output
        ``logits`` (float ``[batch, seq, vocab]``), plus the KV-cache inputs and outputs of a decoder.

    Raises:
        ExportError: the path is not writable (naming it), an op has no ONNX translation (naming the
            op and the node), or the result fails the ONNX checker. Nothing is left on disk.

    Example:
        >>> qgm = llmq_fx.quantize(llmq_fx.trace(model), calib_ids)
        >>> llmq_fx.export.to_onnx(qgm, "opt-w4a4.onnx")
        >>> logits = llmq_fx.export.OnnxCausalLM("opt-w4a4.onnx")(input_ids)
    """
    path = Path(path)
    if format not in FORMATS:
        raise ExportError(f"unknown ONNX format {format!r}; choose from {', '.join(FORMATS)}")
    fused = [n.name for n in gm.graph.nodes if n.target in (torch.ops.llmq.rms_norm.default, torch.ops.llmq.group_query_attention.default)]
    if format == "qdq" and fused:
        raise ExportError(
            f"the graph has fused ops (node {fused[0]}) that only the 'fast' format writes (onnxruntime contrib ops); "
            "build the decoder with quantized_decoder(..., fuse=False) for the standard-ops 'qdq' format"
        )
    if opset < _MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for INT4 QuantizeLinear/DequantizeLinear; use {_MIN_OPSET} or newer")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise ExportError(f"cannot write ONNX file {path}: {err}") from err
    try:
        t0 = time.perf_counter()
        with _on_cpu(gm):
            model = _export_ir(gm, opset, example_input_ids, format, accuracy_level)
        _check_quantized_weights(model, gm)
        config = gm.meta.get("llmq_fx", {}).get("config")
        if config is not None:  # so the file says how it was quantized
            model.metadata_props["llmq_fx.config"] = json.dumps(config)
        model.metadata_props["llmq_fx.format"] = format
        if external_data is None:
            external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
        data_name = f"{path.name}.data" if external_data else None
        staged = staging / path.name
        try:
            ir.save(model, staged, external_data=data_name)
        except OSError as err:
            raise ExportError(f"cannot write ONNX file {path}: {err}") from err
        try:
            # By path, so that models with external data are checked too.
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as err:  # onnx raises ValidationError, InferenceError, ...
            raise ExportError(f"the exported model {path} fails the ONNX checker: {err}") from err
        # External data first, the model last: a model file on disk is always complete.
        for f in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(f, path.parent / f.name)
    except ExportError:
        raise
    except OSError as err:
        raise ExportError(f"cannot write ONNX file {path}: {err}") from err
    except Exception as err:  # e.g. the ONNX optimizer; the caller gets one error type and no file
        raise ExportError(f"export to {path} failed: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s (%.1f kB) in %.1f s", path, path.stat().st_size / 1e3, time.perf_counter() - t0)
    return path


@contextlib.contextmanager
def _on_cpu(gm: fx.GraphModule):
    """Run the export with ``gm`` on the CPU, then put it back where it was: the caller's graph (and
    the model whose parameters it shares) stays on its device."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    if device.type == "cpu":
        yield
        return
    gm.to("cpu")
    try:
        yield
    finally:
        gm.to(device)


def _export_ir(gm: fx.GraphModule, opset: int, example_input_ids: torch.Tensor | None, format: str,
               accuracy_level: int) -> ir.Model:
    """Dynamo export with the llmq translations, integer weights folded, the fast format's rewrites,
    float weights stored as MatMul reads them, then the ONNX optimizer."""
    decoder = gm.meta.get("llmq_fx", {}).get("decoder")
    if decoder is not None:
        from llmq_fx.capture import DecoderSpec, decoder_dynamic_shapes, decoder_example_inputs

        spec = DecoderSpec(**decoder)
        inputs, dynamic_shapes = decoder_example_inputs(spec), decoder_dynamic_shapes(spec)
        input_names, output_names = spec.input_names, spec.output_names
    else:
        if example_input_ids is None:
            example_input_ids = torch.zeros((2, 8), dtype=torch.long)
        # Batch 2, not 1, for the example: a size-1 dim would be specialised instead of staying dynamic.
        inputs, dynamic_shapes = (example_input_ids.cpu(),), ({0: Dim("batch"), 1: Dim("seq")},)
        input_names, output_names = ["input_ids"], ["logits"]
    try:
        with warnings.catch_warnings():
            # A torch.export module reports training mode (and refuses eval()), but its graph was
            # captured in eval mode: dropout is already off, so the exporter's warning is noise.
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(
                gm,
                inputs,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=FAST_TRANSLATION_TABLE if format == "fast" else TRANSLATION_TABLE,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                optimize=False,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; the user needs the op and the node
        raise ExportError(f"torch.onnx.export failed: {_failing_op(err, gm)}") from err
    folded = _fold_integer_casts(program.model.graph)
    logger.debug("folded %d integer casts into initializers", folded)
    if format == "fast":
        converted, kept = _to_matmul_nbits(program.model.graph, accuracy_level)
        logger.debug("MatMulNBits: %d weights, %d left as DequantizeLinear", converted, kept)
        packed = _pack_siblings(program.model.graph)
        logger.debug("MatMulNBits: %d groups of weights reading one input packed into one", packed)
    _resolve_kernel_inputs(program.model.graph)
    transposed = _fold_weight_transposes(program.model.graph)
    logger.debug("float weights stored transposed for MatMul: %d", transposed)
    # Folds constants up to 64k elements: tables the graph computes from its parameters (RoPE's
    # cos/sin of every position, 2 MiB for SmolLM2) stay computed, and onnxruntime folds them at load.
    model = onnxscript.optimizer.optimize(program.model, output_size_limit=_FOLD_LIMIT)
    _view_tied_tables(model.graph)
    for node in model.graph.all_nodes():
        # The exporter's per-node records (stack traces, class hierarchies, fx node text, name scopes):
        # local paths, and 3 MiB of SmolLM2's file.
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch.onnx.") or k == "namespace"]:
            del node.metadata_props[key]
    return model


def _failing_op(err: BaseException, gm: fx.GraphModule) -> str:
    """The op the exporter could not translate and the GraphModule nodes calling it.

    The exporter has no fields for them, so they are read from its message; the node names are
    then looked up in ``gm`` because the exporter re-captures the graph and renames nodes.
    """
    text = str(err)
    match = re.search(r"Error when translating node %\S+ : .*?target=(?:torch\.ops\.)?([\w.]+)", text) or re.search(
        r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text
    )
    if match is None:
        lines = [line for line in text.splitlines() if line.strip()]
        return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
    op = ".".join(g for g in match.groups() if g)
    nodes = [n.name for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == op]
    where = f" (node {', '.join(nodes)})" if nodes else ""
    return f"op {op}{where} has no ONNX translation"


def _fold_integer_casts(graph: ir.Graph) -> int:
    """Replace ``Cast(initializer, to=INT4/...)`` feeding Q/DQ nodes by an integer initializer.

    Weights (input 0 of DequantizeLinear) and zero points (input 2) are cast inside the
    translation functions; folding them here stores the weight as INT4 (two values a byte) and
    removes the int8 buffer, so the file holds the integer weights only once.
    """
    folded: dict[str, tuple[str, ir.Value]] = {}
    for node in list(graph):
        if node.op_type not in _QDQ_OP_TYPES or node.domain not in ("", "ai.onnx"):
            continue
        slots = (0, 2) if node.op_type == "DequantizeLinear" else (2,)
        for i in slots:
            value = node.inputs[i] if i < len(node.inputs) else None
            cast = value.producer() if value is not None else None
            if cast is None or cast.op_type != "Cast":
                continue
            source, dtype = cast.inputs[0], ir.DataType(cast.attributes["to"].as_int())
            if source is None or not source.is_initializer() or source.const_value is None or dtype not in _TYPE_RANGES:
                continue
            if value.name not in folded:
                folded[value.name] = (source.name, _integer_initializer(graph, source, dtype))
            node.replace_input_with(i, folded[value.name][1])
    _remove_dead(graph)
    # The integer initializer takes the buffer's name (``...weight_int``) once the buffer is gone,
    # so ONNX names match the GraphModule's.
    for source_name, value in folded.values():
        if source_name not in graph.initializers:
            graph.initializers.pop(value.name)
            value.name = source_name
            graph.register_initializer(value)
    return len(folded)


def _integer_initializer(graph: ir.Graph, source: ir.Value, dtype: ir.DataType) -> ir.Value:
    """A new initializer of ``dtype`` holding ``source``'s values (checked to fit, not wrapped)."""
    values = source.const_value.numpy()
    lo, hi = _TYPE_RANGES[dtype]
    if values.size and (values.min() < lo or values.max() > hi):
        raise ExportError(f"{source.name}: values in [{values.min()}, {values.max()}] do not fit {dtype.name}")
    name = f"{source.name}.{dtype.name.lower()}"
    tensor = ir.Tensor(np.asarray(values).astype(dtype.numpy()), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _remove_dead(graph: ir.Graph) -> None:
    """Drop the folded Casts and the initializers nothing reads any more."""
    for node in reversed(list(graph)):
        if node.op_type == "Cast" and not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)


def nbits_block_size(in_features: int, group_size: int | None) -> int | None:
    """MatMulNBits ``block_size`` for a weight of ``in_features`` inputs, or None when none fits: the
    weight's own group size if the op accepts it, else (per-channel) the largest of 128/64/32/16
    dividing the row."""
    if group_size is not None:
        return group_size if group_size >= 16 and group_size & (group_size - 1) == 0 else None
    return next((b for b in _NBITS_BLOCKS if in_features % b == 0), None)


def _weight_consumer(dq: ir.Node, use) -> tuple[ir.Value, ir.Node, list[ir.Node], ir.Value | None] | None:
    """The matmul reading a dequantized weight ``[N, K]`` as ``x @ W^T`` through ``use`` (one use of the
    weight: its only one, or the one besides a tied table's Gather): ``(x, node whose output the
    MatMulNBits replaces, nodes it replaces, bias initializer or None)``, or None for any other reader.

    Two forms come out of the exporter: ``Transpose -> MatMul (-> Add bias)`` for inputs of any rank,
    and ``Gemm(x, W, bias, transB=1)`` for 2-D inputs (OPT flattens the MLP's tokens).
    """
    reader, idx = use.node, use.idx
    n_out = dq.inputs[0].shape[0]

    def bias_of(value):
        ok = value is not None and value.is_initializer() and value.const_value is not None and value.shape is not None
        return value if ok and list(value.shape) == [n_out] else None

    if reader.op_type == "Gemm" and idx == 1:
        attrs = {a.name: a.value for a in reader.attributes.values()}
        if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0:
            return None
        bias = reader.inputs[2] if len(reader.inputs) > 2 else None
        if bias is not None and bias_of(bias) is None:
            return None
        return reader.inputs[0], reader, [reader], bias
    if reader.op_type != "Transpose":
        return None
    t_uses = list(reader.outputs[0].uses())
    if len(t_uses) != 1 or t_uses[0].node.op_type != "MatMul" or t_uses[0].idx != 1:
        return None
    matmul = t_uses[0].node
    mm_uses = list(matmul.outputs[0].uses())
    if len(mm_uses) == 1 and mm_uses[0].node.op_type == "Add" and not matmul.outputs[0].is_graph_output():
        add = mm_uses[0].node
        bias = bias_of(add.inputs[1 - mm_uses[0].idx])
        if bias is not None:
            return matmul.inputs[0], add, [add, matmul, reader], bias
    return matmul.inputs[0], matmul, [matmul, reader], None


def _to_matmul_nbits(graph: ir.Graph, accuracy_level: int) -> tuple[int, int]:
    """Rewrite ``DequantizeLinear(int weight)`` and the matmul reading it (``_weight_consumer``) into MatMulNBits.

    The codes ``q`` (signed, zero point 0) are stored as ``q + 2^(bits-1)``, which the op's default
    zero point ``2^(bits-1)`` takes back off: ``(u - z) * s == q * s`` exactly. Returns (rewritten,
    left as DequantizeLinear because no block size fits).
    """
    converted = kept = 0
    for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
        w = dq.inputs[0]
        if w is None or not w.is_initializer() or w.const_value is None or w.dtype not in (ir.DataType.INT4, ir.DataType.INT8):
            continue
        uses = list(dq.outputs[0].uses())
        gathers = [u for u in uses if _is_row_gather(u)]  # a tied table: the embedding reads it too
        others = [u for u in uses if u not in gathers]
        found = _weight_consumer(dq, others[0]) if len(others) == 1 and len(gathers) <= 1 else None
        if found is None:
            if _to_gather_block_quantized(graph, dq):
                converted += 1
            continue
        x, last, replaced, bias = found
        level, x = _kernel_input(x, accuracy_level)
        codes = w.const_value.numpy().astype(np.int32)
        n_out, k_in = codes.shape
        found_scales = _block_scales(dq, k_in)
        if found_scales is None:
            kept += 1
            continue
        scales, block = found_scales
        bits = 4 if w.dtype == ir.DataType.INT4 else 8
        blocks = k_in // block
        unsigned = (codes + 2 ** (bits - 1)).astype(np.uint8).reshape(n_out, blocks, block)
        packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4) if bits == 4 else unsigned
        b_value = _initializer(graph, w.name + ".nbits", np.ascontiguousarray(packed, dtype=np.uint8))
        s_value = _initializer(graph, w.name + ".nbits_scale", scales)
        node = ir.node(
            "MatMulNBits", [x, b_value, s_value, None, None, bias],
            attributes={"K": k_in, "N": n_out, "bits": bits, "block_size": block, "accuracy_level": level},
            domain="com.microsoft", name=f"{w.name}.MatMulNBits",
        )
        graph.insert_before(last, node)
        _replace_value(graph, last.outputs[0], node.outputs[0], replaced)
        if gathers:  # a tied table: the embedding reads the lm_head's packed codes and scales
            _shared_gather(graph, gathers[0].node, b_value, s_value, n_out, k_in, bits, block)
        graph.remove(dq, safe=True)
        converted += 1
    if converted:
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1
        _remove_dead(graph)
        # The packed codes take the integer weight's name, so ONNX names still match the GraphModule's.
        for value in list(graph.initializers.values()):
            if value.name.endswith(".nbits") and value.name[: -len(".nbits")] not in graph.initializers:
                graph.initializers.pop(value.name)
                value.name = value.name[: -len(".nbits")]
                graph.register_initializer(value)
    return converted, kept


# On a MatMulNBits that packs several Linears: JSON ``[[integer weight name, N], ...]`` in output order.
PACKED_META = "llmq.packed_weights"


def _pack_siblings(graph: ir.Graph) -> int:
    """MatMulNBits nodes that read the same input with the same ``K``, bits, block size and accuracy level
    (q/k/v after their shared activation quantizer, gate/up) become one MatMulNBits over their codes,
    scales and biases stacked along ``N``, and a ``Split`` back into the original outputs: one kernel call
    and one pass over the input instead of several (onnxruntime-genai's builder packs the same way).
    ``PACKED_META`` on the packed node names the integer weights it holds, in order. Returns the groups."""
    groups: dict[int, list[ir.Node]] = {}  # input value -> its MatMulNBits readers, in graph order
    for node in graph:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and node.inputs[0] is not None:
            groups.setdefault(id(node.inputs[0]), []).append(node)
    packed = 0
    for nodes in groups.values():
        nodes = [n for n in nodes if _packable(n)]
        if len(nodes) < 2:
            continue
        attrs = [{k: v.value for k, v in n.attributes.items()} for n in nodes]
        key = {(a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0)) for a in attrs}
        biased = {len(n.inputs) > 5 and n.inputs[5] is not None for n in nodes}
        if len(key) != 1 or len(biased) != 1:
            continue
        sizes = [a["N"] for a in attrs]
        first = nodes[0].inputs[1].name
        codes = np.concatenate([n.inputs[1].const_value.numpy() for n in nodes], axis=0)
        scales = np.concatenate([n.inputs[2].const_value.numpy().reshape(a["N"], -1) for n, a in zip(nodes, attrs)], axis=0)
        inputs = [nodes[0].inputs[0], _initializer(graph, first + ".packed", np.ascontiguousarray(codes)),
                  _initializer(graph, first + ".packed_scale", np.ascontiguousarray(scales))]
        if biased.pop():
            bias = np.concatenate([n.inputs[5].const_value.numpy() for n in nodes])
            inputs += [None, None, _initializer(graph, first + ".packed_bias", bias)]
        fused = ir.node("MatMulNBits", inputs, attributes={**attrs[0], "N": sum(sizes)}, domain="com.microsoft",
                        name=f"{first}.packed.MatMulNBits")
        fused.metadata_props[PACKED_META] = json.dumps([[n.inputs[1].name, a["N"]] for n, a in zip(nodes, attrs)])
        split = ir.node("Split", [fused.outputs[0], _initializer(graph, first + ".packed_split", np.array(sizes, np.int64))],
                        attributes={"axis": -1}, num_outputs=len(nodes), name=f"{first}.packed.Split")
        graph.insert_before(nodes[0], [fused, split])
        for node, out in zip(nodes, split.outputs):
            _replace_value(graph, node.outputs[0], out, [node])
        packed += 1
    if packed:
        _remove_dead(graph)
    return packed


def _packable(node: ir.Node) -> bool:
    """Codes and scales held as initializers, no zero points or group indices, a constant bias or none."""
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    return (all(v is not None and v.const_value is not None for v in ins[1:3]) and ins[3] is None and ins[4] is None
            and (ins[5] is None or ins[5].const_value is not None))


def _block_scales(dq: ir.Node, k_in: int) -> tuple[np.ndarray, int] | None:
    """``(scales [rows, k_in / block], block)`` of a weight DequantizeLinear, per-row scales repeated, or None."""
    scale = dq.inputs[1].const_value.numpy() if dq.inputs[1].const_value is not None else None
    if scale is None:
        return None
    attrs = {a.name: a.value for a in dq.attributes.values()}
    group = attrs.get("block_size") if attrs.get("axis", 1) == 1 and scale.ndim == 2 else None
    block = nbits_block_size(k_in, group)
    if block is None:
        return None
    scales = np.repeat(scale[:, None], k_in // block, axis=1) if scale.ndim == 1 else scale
    return np.ascontiguousarray(scales, dtype=np.float32), block


# Node metadata the fast translation puts on an 8-bit symmetric per-group dynamic QDQ: the int8 input
# quantization MatMulNBits does itself at accuracy level 4 (value: the group size).
KERNEL_INPUT_META = "llmq.int8_kernel_input"
KERNEL_INPUT_START_META = "llmq.int8_kernel_input_start"


def _kernel_input(x: ir.Value, accuracy_level: int) -> tuple[int, ir.Value]:
    """``(accuracy_level, A)`` for a MatMulNBits reading ``x``: when ``x`` is a tagged int8 per-group
    quantization, the kernel does it (level 4) and reads the quantization's own input."""
    node = x.producer()
    if node is None or KERNEL_INPUT_META not in node.metadata_props:
        return accuracy_level, x
    stack, seen = [node], set()
    while stack:  # back through the quantization's ops to the one that read its input
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if KERNEL_INPUT_START_META in n.metadata_props:
            return 4, n.inputs[0]
        stack.extend(v.producer() for v in n.inputs if v is not None and v.producer() is not None)
    raise ExportError(f"int8 kernel input {x.name}: its start is not tagged")


def _resolve_kernel_inputs(graph: ir.Graph) -> None:
    """Drop the tags of int8 input quantizations no MatMulNBits took over: they stay as float ops."""
    for node in graph:
        node.metadata_props.pop(KERNEL_INPUT_META, None)
        node.metadata_props.pop(KERNEL_INPUT_START_META, None)


def _is_row_gather(use) -> bool:
    """A ``Gather(axis 0)`` reading the value as its table (an embedding lookup)."""
    attrs = {a.name: a.value for a in use.node.attributes.values()}
    return use.node.op_type == "Gather" and use.idx == 0 and attrs.get("axis", 0) == 0


def _shared_gather(graph: ir.Graph, gather: ir.Node, b_value: ir.Value, s_value: ir.Value, rows: int, k_in: int,
                   bits: int, block: int) -> None:
    """Replace an embedding ``Gather`` of a tied table by ``GatherBlockQuantized`` over the MatMulNBits'
    own codes (``[N, blocks, blob]`` viewed as ``[N, K * bits / 8]`` uint8, as onnxruntime-genai's builder
    shares them) and scales: one copy of the table in the file. With uint8 data and no zero points both
    ops take ``2^(bits-1)`` as the zero point, so they read the same values. The view is put in after the
    ONNX optimizer (``_view_tied_tables``), which would fold it into a second copy of a small table."""
    node = ir.node(
        "GatherBlockQuantized", [b_value, gather.inputs[1], s_value],
        attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
        domain="com.microsoft", name=f"{b_value.name}.GatherBlockQuantized",
    )
    node.metadata_props[TIED_VIEW_META] = json.dumps([rows, k_in * bits // 8])
    graph.insert_before(gather, node)
    _replace_value(graph, gather.outputs[0], node.outputs[0], [gather])


# On a GatherBlockQuantized reading a MatMulNBits' packed codes: the ``[rows, bytes per row]`` view it needs.
TIED_VIEW_META = "llmq.tied_table_view"


def _view_tied_tables(graph: ir.Graph) -> int:
    """Give each GatherBlockQuantized of a tied table (``_shared_gather``) its ``Reshape`` view of the codes."""
    count = 0
    for node in list(graph):
        view = node.metadata_props.pop(TIED_VIEW_META, None)
        if view is None:
            continue
        codes = node.inputs[0]
        shape = _initializer(graph, codes.name + ".rows_shape", np.array(json.loads(view), dtype=np.int64))
        reshape = ir.node("Reshape", [codes, shape], name=f"{codes.name}.Reshape")
        graph.insert_before(node, reshape)
        node.replace_input_with(0, reshape.outputs[0])
        count += 1
    return count


def _to_gather_block_quantized(graph: ir.Graph, dq: ir.Node) -> bool:
    """Rewrite ``DequantizeLinear(int table) -> Gather(axis 0)`` (a quantized embedding) into
    ``com.microsoft.GatherBlockQuantized``: INT4 codes as they are (its default zero point is 0 for
    int4), 8-bit codes shifted to uint8 (default zero point 128)."""
    uses = list(dq.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Gather" or uses[0].idx != 0:
        return False
    gather = uses[0].node
    if {a.name: a.value for a in gather.attributes.values()}.get("axis", 0) != 0:
        return False
    table = dq.inputs[0]
    rows, k_in = table.shape
    found = _block_scales(dq, k_in)
    if found is None:
        return False
    scales, block = found
    if table.dtype == ir.DataType.INT4:
        data, bits = table, 4
    else:
        codes = table.const_value.numpy().astype(np.int32)
        data, bits = _initializer(graph, table.name + ".nbits", (codes + 128).astype(np.uint8)), 8
    s_value = _initializer(graph, table.name + ".nbits_scale", scales)
    node = ir.node(
        "GatherBlockQuantized", [data, gather.inputs[1], s_value],
        attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
        domain="com.microsoft", name=f"{table.name}.GatherBlockQuantized",
    )
    graph.insert_before(gather, node)
    _replace_value(graph, gather.outputs[0], node.outputs[0], [gather, dq])
    return True


def _fold_weight_transposes(graph: ir.Graph) -> int:
    """Store every float weight as the ``[K, N]`` constant its MatMul reads: ``Transpose(W) -> MatMul``
    becomes ``MatMul(x, W^T)`` with ``W^T`` an initializer, and ``Gemm(x, W, b, transB=1)`` (the
    exporter's form of a 2-D Linear) becomes ``MatMul(x, W^T) + b``. The same math; onnxruntime would
    fold the transposes at load time anyway, but tools that read the file (onnxruntime's
    ``MatMulNBitsQuantizer`` looks for ``MatMul`` with a constant weight) see every Linear."""
    count = 0
    for node in list(graph):
        w = node.inputs[0] if node.op_type == "Transpose" else node.inputs[1] if node.op_type == "Gemm" else None
        if w is None or not w.is_initializer() or w.const_value is None or w.dtype != ir.DataType.FLOAT:
            continue
        if len(w.shape) != 2 or len(list(w.uses())) != 1:
            continue
        attrs = {a.name: a.value for a in node.attributes.values()}
        if node.op_type == "Transpose":
            if list(attrs.get("perm", [1, 0])) != [1, 0]:
                continue
            uses = list(node.outputs[0].uses())
            if not uses or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
                continue
            t = _initializer(graph, w.name + ".T", np.ascontiguousarray(w.const_value.numpy().T))
            node.outputs[0].replace_all_uses_with(t)
            graph.remove(node, safe=True)
        else:
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 \
                    or attrs.get("beta", 1.0) != 1.0:
                continue
            t = _initializer(graph, w.name + ".T", np.ascontiguousarray(w.const_value.numpy().T))
            matmul = ir.node("MatMul", [node.inputs[0], t], name=f"{node.name}.MatMul")
            graph.insert_before(node, matmul)
            last = matmul
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                last = ir.node("Add", [matmul.outputs[0], node.inputs[2]], name=f"{node.name}.Add")
                graph.insert_before(node, last)
            _replace_value(graph, node.outputs[0], last.outputs[0], [node])
        count += 1
    if count:
        _remove_dead(graph)
        for value in list(graph.initializers.values()):  # the transposed weight takes the weight's name
            if value.name.endswith(".T") and value.name[:-2] not in graph.initializers:
                graph.initializers.pop(value.name)
                value.name = value.name[:-2]
                graph.register_initializer(value)
    return count


def _replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value, dead: list[ir.Node]) -> None:
    """``new`` takes ``old``'s place: its readers (graph outputs too), its type and shape (a graph output
    needs them) and its name, once the replaced nodes ``dead`` are gone."""
    new.type, new.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    for node in dead:
        graph.remove(node, safe=True)
    new.name = name


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _check_quantized_weights(model: ir.Model, gm: fx.GraphModule) -> None:
    """Every quantized weight is an integer initializer read by DequantizeLinear (or packed codes read
    by MatMulNBits / GatherBlockQuantized), with no float copy."""
    initializers = model.graph.initializers
    readers = {"DequantizeLinear": set(_TYPE_RANGES), "MatMulNBits": {ir.DataType.UINT8},
               "GatherBlockQuantized": {ir.DataType.INT4, ir.DataType.UINT8}}

    def reader_ops(value: ir.Value) -> set[str]:  # a tied table: MatMulNBits and the Reshape GatherBlockQuantized reads
        ops = set()
        for use in value.uses():
            if use.node.op_type == "Reshape" and use.idx == 0 and {u.node.op_type for u in use.node.outputs[0].uses()} == {
                    "GatherBlockQuantized"}:
                continue
            ops.add(use.node.op_type)
        return ops

    packed = {name: n.inputs[1] for n in model.graph.all_nodes() if PACKED_META in n.metadata_props
              for name, _ in json.loads(n.metadata_props[PACKED_META])}
    for node in gm.graph.nodes:
        if node.target is not torch.ops.llmq.dequantize_weight.default:
            continue
        name = node.args[0].target
        value = initializers.get(name, packed.get(name))
        ops = reader_ops(value) if value is not None else set()
        if value is None or len(ops) != 1 or value.dtype not in readers.get(next(iter(ops)), ()):
            raise ExportError(
                f"weight {name} (node {node.name}) is not an integer initializer read by DequantizeLinear or "
                f"MatMulNBits alone in the ONNX model (read by {sorted(ops) or 'nothing'})"
            )
        float_name = node.meta.get(WEIGHT_META, {}).get("replaces")
        if float_name and float_name in initializers and not _read_elsewhere(gm, float_name):
            raise ExportError(f"the ONNX model still holds the float weight {float_name}")


def _read_elsewhere(gm: fx.GraphModule, target: str) -> bool:
    """Whether the graph still reads a float weight (a tied embedding the integer copy replaced in one place)."""
    return any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
