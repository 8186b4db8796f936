"""Export a captured (float or quantized) GraphModule to an ONNX QDQ model.

``to_onnx`` runs the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with the llmq ops
translated to ``QuantizeLinear``/``DequantizeLinear`` (``llmq_fx.export.translation``), then
rewrites the ONNX graph so that every quantized weight is stored as an integer initializer
(INT4 packed two values a byte, as ONNX stores it) read directly by ``DequantizeLinear``. The
exporter itself would keep the int8 buffer and a ``Cast(to=INT4)``, and its constant folder only
folds small tensors, so the fold is done here, for every size, before the ONNX optimizer runs.

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
import torch
from torch import fx
from torch.export import Dim

from llmq_fx.errors import ExportError
from llmq_fx.export.translation import TRANSLATION_TABLE
from llmq_fx.passes.insert_qdq import WEIGHT_META

__all__ = ["to_onnx", "EXTERNAL_DATA_THRESHOLD_BYTES"]

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GiB; stay clear of it (graph + metadata need room too).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

# INT4/UINT4 types and blocked (block_size) DequantizeLinear need opset 21.
_MIN_OPSET = 21

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
) -> Path:
    """Export ``gm`` (``input_ids [batch, seq] -> logits``) to an ONNX file.

    Args:
        gm: the output of ``llmq_fx.trace`` or ``llmq_fx.quantize``.
        path: the ``.onnx`` file to write; its folder must exist.
        opset: ONNX opset, at least 21 (INT4/UINT4 in QuantizeLinear/DequantizeLinear).
        example_input_ids: ids used to trace the export; by default zeros ``[2, 8]``. Batch and
            sequence stay dynamic whatever is passed.
        external_data: store initializers in ``<path>.data``; by default only when the weights
            are too big for one protobuf (about 2 GB).

    Returns:
        The path of the written model: input ``input_ids`` (int64 ``[batch, seq]``), output
        ``logits`` (float ``[batch, seq, vocab]``).

    Raises:
        ExportError: the path is not writable (naming it), an op has no ONNX translation (naming the
            op and the node), or the result fails the ONNX checker. Nothing is left on disk.

    Example:
        >>> qgm = llmq_fx.quantize(llmq_fx.trace(model), calib_ids)
        >>> llmq_fx.export.to_onnx(qgm, "opt-w4a4.onnx")
        >>> logits = llmq_fx.export.OnnxCausalLM("opt-w4a4.onnx")(input_ids)
    """
    path = Path(path)
    if opset < _MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for INT4 QuantizeLinear/DequantizeLinear; use {_MIN_OPSET} or newer")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise ExportError(f"cannot write ONNX file {path}: {err}") from err
    try:
        t0 = time.perf_counter()
        with _on_cpu(gm):
            model = _export_ir(gm, opset, example_input_ids)
        _check_quantized_weights(model, gm)
        config = gm.meta.get("llmq_fx", {}).get("config")
        if config is not None:  # so the file says how it was quantized
            model.metadata_props["llmq_fx.config"] = json.dumps(config)
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


def _export_ir(gm: fx.GraphModule, opset: int, example_input_ids: torch.Tensor | None) -> ir.Model:
    """Dynamo export with the llmq translations, integer weights folded, then the ONNX optimizer."""
    if example_input_ids is None:
        example_input_ids = torch.zeros((2, 8), dtype=torch.long)
    example_input_ids = example_input_ids.cpu()
    # Batch 2, not 1, for the example: a size-1 dim would be specialised instead of staying dynamic.
    dynamic_shapes = ({0: Dim("batch"), 1: Dim("seq")},)
    try:
        with warnings.catch_warnings():
            # A torch.export module reports training mode (and refuses eval()), but its graph was
            # captured in eval mode: dropout is already off, so the exporter's warning is noise.
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            program = torch.onnx.export(
                gm,
                (example_input_ids,),
                dynamo=True,
                opset_version=opset,
                custom_translation_table=TRANSLATION_TABLE,
                dynamic_shapes=dynamic_shapes,
                input_names=["input_ids"],
                output_names=["logits"],
                optimize=False,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; the user needs the op and the node
        raise ExportError(f"torch.onnx.export failed: {_failing_op(err, gm)}") from err
    folded = _fold_integer_casts(program.model.graph)
    logger.debug("folded %d integer casts into initializers", folded)
    program.optimize()
    for node in program.model.graph.all_nodes():
        # Python stack traces of the export call: local paths, and most of a small model's file size.
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    return program.model


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


def _check_quantized_weights(model: ir.Model, gm: fx.GraphModule) -> None:
    """Every quantized Linear's weight is an integer initializer read by DequantizeLinear, with no float copy."""
    initializers = model.graph.initializers
    for node in gm.graph.nodes:
        if node.target is not torch.ops.llmq.dequantize_weight.default:
            continue
        name = node.args[0].target
        value = initializers.get(name)
        if value is None or value.dtype not in _TYPE_RANGES:
            raise ExportError(f"weight {name} (node {node.name}) is not an integer initializer in the ONNX model")
        if not value.uses() or any(use.node.op_type != "DequantizeLinear" for use in value.uses()):
            raise ExportError(f"weight {name} (node {node.name}) is not read by DequantizeLinear alone")
        float_name = node.meta.get(WEIGHT_META, {}).get("replaces")
        if float_name and float_name in initializers and not _read_elsewhere(gm, float_name):
            raise ExportError(f"the ONNX model still holds the float weight {float_name}")


def _read_elsewhere(gm: fx.GraphModule, target: str) -> bool:
    """Whether the graph still reads a float weight (a tied embedding the integer copy replaced in one place)."""
    return any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
