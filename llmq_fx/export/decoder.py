"""The quantized model as a KV-cache decoder: a quantization moved onto the decoder capture.

``llmq_fx.quantize`` runs on ``trace``'s graph (``input_ids -> logits``), which is what calibration,
GPTQ and perplexity need. Generation needs the same model with a KV cache, attention mask and
positions (``capture.trace_decoder``). Both captures share the model's modules, so the quantization
is moved from one to the other rather than run twice:

1. the decoder is captured from the float model (a private copy of its parameters);
2. ``RotatePass`` runs on it with the options recorded in the quantized graph's recipe, giving the
   same graph structure (LayerNorm -> RMS form, untied embedding/lm_head, norm biases folded into
   reader biases, online Hadamard nodes before fc2/down_proj);
3. for every Linear (matched by module path and call order), the nodes between its input's producer
   and the Linear in the quantized graph (activation QDQ, mixed-precision splits) and its integer
   weight (``dequantize_weight`` of its codes and scales) are copied in front of the decoder's Linear;
4. every tensor the decoder reads takes the quantized graph's value of the same name (rotated
   embeddings, norms, biases, codes, scales, rotation factors), so nothing is recomputed.

The result computes, on an empty cache, the logits the quantized graph computes (checked on a few
tokens before it is returned), and step by step with a growing cache after that.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn

from llmq_fx.capture import trace_decoder
from llmq_fx.errors import ExportError, UnsupportedModelError
from llmq_fx.graph import attr, is_linear, module_path, set_attr

__all__ = ["quantized_decoder", "check_decoder"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
_LLMQ_OPS = {
    torch.ops.llmq.quantize_dequantize.default,
    torch.ops.llmq.quantize_dequantize_dynamic.default,
    torch.ops.llmq.dequantize_weight.default,
}


def quantized_decoder(qgm: fx.GraphModule, model: nn.Module, check: bool = True, fuse: bool = True) -> fx.GraphModule:
    """The KV-cache decoder of ``model`` computing what ``qgm`` (``llmq_fx.quantize(llmq_fx.trace(model), ...)``,
    or ``llmq_fx.load`` of it) computes.

    Args:
        qgm: the quantized graph; not modified.
        model: the float Hugging Face model ``qgm`` was captured from; not modified.
        check: compare the decoder's logits on an empty cache with ``qgm``'s on 8 tokens.
        fuse: replace RMSNorms and KV-cache attentions by ``llmq.rms_norm`` /
            ``llmq.group_query_attention`` (``FuseRMSNormPass``, ``FuseAttentionPass``), which the ``fast``
            ONNX format writes as onnxruntime's fused ops; the ``qdq`` format needs ``fuse=False``.

    Returns:
        A GraphModule ``(input_ids, attention_mask, position_ids, past) -> (logits, *present)`` with
        ``meta["llmq_fx"]`` = ``qgm``'s record plus the ``decoder`` spec.

    Raises:
        UnsupportedModelError: a Linear or tensor of one capture has no counterpart in the other.
        ExportError: the check found different logits.
    """
    from llmq_fx.passes.rotate import RotatePass

    dgm = trace_decoder(model)
    on_meta = next(model.parameters()).device.type == "meta"  # e.g. for a graph from llmq_fx.trace_checkpoint
    spec = dgm.meta["llmq_fx"]["decoder"]
    _own_tensors(dgm)
    meta = qgm.meta.get("llmq_fx", {})
    for entry in meta.get("recipe", []):
        if entry["pass"] == "RotatePass" and not meta.get("rotation_skipped"):
            # The same structure; the order of the channels (sort) is in the tensors copied from qgm below.
            RotatePass(RotatePass.Options(**{**entry["options"], "sort": None}))(dgm)
    _transplant_linears(qgm, dgm)
    dgm.graph.eliminate_dead_code()
    _copy_tensors(qgm, dgm)
    _drop_unread(dgm)
    if on_meta:
        _off_meta(dgm, next((t.device for t in qgm.parameters()), torch.device("cpu")))
    dgm.graph.lint()
    dgm.recompile()
    dgm.meta["llmq_fx"] = {**{k: v for k, v in meta.items() if k != "site_stats"}, "decoder": spec, "fused": fuse}
    if fuse:
        from llmq_fx.passes.fuse_attention import FuseAttentionPass
        from llmq_fx.passes.fuse_rms_norm import FuseRMSNormPass

        FuseRMSNormPass()(dgm)
        FuseAttentionPass()(dgm)
    if check:
        check_decoder(qgm, dgm)
    return dgm


def check_decoder(qgm: fx.GraphModule, dgm: fx.GraphModule, tokens: int = 8) -> dict:
    """Compare the logits of ``dgm`` on an empty cache with ``qgm``'s, on ``tokens`` tokens.

    Both graphs compute the same thing, but not in the same float order (fused norm and attention):
    a rounding that lands on the other side of a 4-bit step moves a logit by a quantization step, so
    the check is not bitwise. A decoder that moved the quantization wrongly (a weight, a scale, a
    rotation) is far off on every token. Raises ``ExportError`` when the largest difference passes 5%
    of the largest logit or fewer than 3 of 4 tokens keep their top-1. Returns both measures."""
    from llmq_fx.capture import DecoderSpec

    spec = DecoderSpec(**dgm.meta["llmq_fx"]["decoder"])
    device = next((p.device for p in dgm.parameters()), torch.device("cpu"))
    ids = torch.randint(0, spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    empty = [torch.zeros(1, spec.num_kv_heads, 0, spec.head_size, device=device) for _ in range(2 * spec.num_layers)]
    with torch.no_grad():
        ref = qgm(ids)
        out = dgm(ids, torch.ones_like(ids), torch.arange(tokens, device=device)[None], empty)[0]
    relative = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    if not (relative <= 0.05 and agree >= 0.75):
        raise ExportError(
            f"the KV-cache decoder does not compute the quantized graph's logits (largest difference {relative:.1%} "
            f"of the largest logit, top-1 agreement {agree:.0%} on {tokens} tokens)"
        )
    return {"relative_difference": relative, "top1_agreement": agree}


def _own_tensors(gm: fx.GraphModule) -> None:
    """Give ``gm`` its own parameters and buffers: a capture shares the model's, and the rotation
    replay writes into them. Names that share a tensor (tied embedding and lm_head) share its copy,
    so the replay sees the same ties."""
    copies: dict[int, torch.Tensor] = {}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) not in copies:
            clone = t.detach().clone()
            copies[id(t)] = nn.Parameter(clone, requires_grad=False) if isinstance(t, nn.Parameter) else clone
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if isinstance(t, nn.Parameter):
            module._parameters[leaf] = copies[id(t)]
        else:
            module._buffers[leaf] = copies[id(t)]


def _keyed_weight_readers(gm: fx.GraphModule) -> dict[tuple[str, str, int], fx.Node]:
    """Linear and embedding nodes by (kind, module path, call index): a module called twice has two keys."""
    seen: dict[tuple[str, str], int] = {}
    out = {}
    for node in gm.graph.nodes:
        kind = "linear" if is_linear(node) else "embedding" if node.target == aten.embedding.default else None
        if kind is None:
            continue
        key = (kind, module_path(node))
        out[(*key, seen.get(key, 0))] = node
        seen[key] = seen.get(key, 0) + 1
    return out


def _is_quantization(node: fx.Node) -> bool:
    """A node InsertQDQPass (or a weight quantizer) put between a producer and its Linear."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    if node.target in _LLMQ_OPS:
        return True
    if node.target == aten.cat.default:  # mixed precision: the parts' QDQ joined
        return all(isinstance(a, fx.Node) and a.target in _LLMQ_OPS for a in node.args[0])
    if node.target == aten.index_select.default:  # mixed precision: channels split off, or put back
        src = node.args[0]
        return (src.op == "call_function" and src.target == aten.cat.default and _is_quantization(src)) or (
            len(node.users) == 1 and next(iter(node.users)).target in _LLMQ_OPS
        )
    return False


def _producers(root: fx.Node) -> set[fx.Node]:
    """The non-quantization nodes the quantization subgraph ending at ``root`` reads."""
    found, stack, seen = set(), [root], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_quantization(n):
            stack.extend(n.all_input_nodes)
        else:
            found.add(n)
    return found


def _transplant_linears(qgm: fx.GraphModule, dgm: fx.GraphModule) -> None:
    """Copy each Linear's input quantization and integer weight, and each embedding's integer table."""
    q_lin, d_lin = _keyed_weight_readers(qgm), _keyed_weight_readers(dgm)
    if set(q_lin) != set(d_lin):
        missing = sorted(set(q_lin) ^ set(d_lin))[:3]
        raise UnsupportedModelError(f"the decoder capture and the quantized graph have different Linears/embeddings: {missing}")
    memo: dict[fx.Node, fx.Node] = {}
    for key, lq in q_lin.items():
        ld = d_lin[key]
        # Linear: activation input (0) and weight (1); embedding: its table (0), not the ids.
        for index in ((0, 1) if key[0] == "linear" else (0,)):
            src = lq.args[index]
            if not isinstance(src, fx.Node) or src.op == "get_attr" or not _is_quantization(src):
                continue  # a float input or weight: nothing to move
            boundary = {}
            if index == 0 and key[0] == "linear":
                producers = _producers(src)
                if len(producers) != 1:
                    raise UnsupportedModelError(f"{key[0]}: its input quantization reads {len(producers)} nodes, not one")
                boundary[producers.pop()] = ld.args[0]
            new = _copy(qgm, dgm, src, boundary, memo, before=ld)
            ld.replace_input_with(ld.args[index], new)


def _copy(qgm, dgm, node: fx.Node, boundary: dict, memo: dict, before: fx.Node) -> fx.Node:
    if node in boundary:
        return boundary[node]
    if node in memo:
        return memo[node]
    graph = dgm.graph
    if node.op == "get_attr":
        set_attr(dgm, node.target, attr(qgm, node.target).detach().clone())
        with graph.inserting_before(before):
            new = graph.get_attr(node.target)
    else:
        args = fx.map_arg(node.args, lambda a: _copy(qgm, dgm, a, boundary, memo, before))
        kwargs = fx.map_arg(node.kwargs, lambda a: _copy(qgm, dgm, a, boundary, memo, before))
        with graph.inserting_before(before):
            new = graph.call_function(node.target, args, kwargs)
        new.meta = copy.copy(node.meta)
    memo[node] = new
    return new


def _copy_tensors(qgm: fx.GraphModule, dgm: fx.GraphModule) -> None:
    """Every tensor the decoder reads takes the quantized graph's value of the same name. Tensors the
    quantized graph has no name for are the decoder capture's own constants (its cache and mask
    code) and stay; a model tensor missed here would show in ``check_decoder``."""
    kept = []
    for node in dgm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            value = attr(qgm, node.target)
        except AttributeError:
            kept.append(node.target)
            continue
        mine = attr(dgm, node.target)
        if mine.shape != value.shape:
            raise UnsupportedModelError(f"tensor {node.target}: {tuple(mine.shape)} in the decoder, {tuple(value.shape)} quantized")
        if value.is_floating_point() and mine.is_floating_point():
            value = value.to(mine.dtype)  # as captured: a float graph may store its weights narrower (trace_checkpoint)
        set_attr(dgm, node.target, value.detach().clone(), buffer=not isinstance(mine, nn.Parameter))
    if kept:
        logger.debug("decoder constants kept: %s", kept)


def _off_meta(gm: fx.GraphModule, device: torch.device) -> None:
    """A decoder captured from a model on the meta device, once every model tensor came from the quantized
    graph: its factories and moves name ``device``, and the capture's own constants (the empty tensors a
    first step's cache starts from) are made there. A constant with values cannot be made up: error."""
    from llmq_fx.graph import retarget_devices

    retarget_devices(gm, "meta", device)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = attr(gm, node.target)
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            if t.numel():
                raise UnsupportedModelError(
                    f"decoder tensor {node.target} {tuple(t.shape)} was captured on the meta device and the quantized "
                    "graph has no tensor of that name: export from the model with its weights")
            owner, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, leaf, torch.empty(t.shape, dtype=t.dtype, device=device))


def _drop_unread(gm: fx.GraphModule) -> None:
    """Drop parameters no node reads (the float weights the integer ones replaced)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
