"""Attention fusion pass: a KV-cache attention computed op by op becomes one ``llmq.group_query_attention``.

Pattern, in a decoder graph from ``capture.trace_decoder`` (what Hugging Face's attention with a
``DynamicCache`` exports to):

* ``scaled_dot_product_attention(q, k_all, v_all, mask, scale=s)``, ``q`` ``[B, H, S, D]``;
* ``k_all`` / ``v_all``: ``cat([past, new], -2)`` of the cache input and this step's keys / values
  ``[B, KV, S, D]``, through the head broadcast of grouped-query attention (``unsqueeze``/``expand``/
  ``reshape``); those ``cat`` nodes are also the graph's ``present`` outputs;
* the output ``[B, H, S, D]`` taken back to ``[B, S, H * D]`` by ``reshape``/``transpose``/``reshape``.

Rewrite: ``llmq.group_query_attention(q', k', v', past_k, past_v, seqlens_k, total_length, cos, sin,
position_ids, H, KV, s)``
with ``q'``/``k'``/``v'`` in ``[B, S, heads * D]`` (``v'`` and, without RoPE, ``k'`` are the projections'
outputs themselves), its output in place of the final reshape and its grown caches in place of the
``cat`` nodes; ``seqlens_k`` (valid length - 1) and ``total_length`` come from the attention mask once
for all layers. The mask subgraph becomes dead and goes. The ``fast`` ONNX format writes the op as
``com.microsoft.GroupQueryAttention``. A rotary embedding in front of the attention (Llama's RoPE:
``x * cos + rotate_half(x) * sin`` of ``position_ids * inv_freq``) moves into the op too (its
``do_rotary``, with cos/sin tables of every position computed from ``inv_freq``), and ``q'``/``k'`` are
then the projections' outputs themselves. Semantics: causal attention over unpadded (or right-padded)
sequences, what onnxruntime-genai feeds; a left-padded batch would need the mask the graph computed.
Head sizes that are not a multiple of 8 (which onnxruntime's CPU kernel refuses) are left unfused.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from llmq_fx import ops  # noqa: F401  (registers torch.ops.llmq)

__all__ = ["FuseAttentionPass"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_BROADCAST = {aten.slice.Tensor, aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device}


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _cache_cat(node: fx.Node) -> fx.Node | None:
    """The ``cat([past, new], -2)`` a (head-broadcast) key/value reads."""
    while _is(node, *_BROADCAST) and not _is(node, aten.cat.default):
        node = node.args[0]
    if _is(node, aten.cat.default) and len(node.args[0]) == 2 and node.args[1] in (-2, 2):
        return node
    return None


def _cache_input(node: fx.Node) -> fx.Node:
    """The past cache tensor: a ``cat([empty, past])`` of DynamicCache's first update is the past itself."""
    if _is(node, aten.cat.default) and len(node.args[0]) == 2:
        first, second = node.args[0]
        val = first.meta.get("val") if isinstance(first, fx.Node) else None
        if val is not None and val.numel() == 0:
            return second
    return node


def _heads_to_tokens(gm, node: fx.Node, before: fx.Node) -> fx.Node:
    """``[B, heads, S, D]`` -> ``[B, S, heads * D]``: the projection output itself when ``node`` is just its
    ``view -> transpose(1, 2)``, else a transpose and a reshape."""
    if _is(node, aten.transpose.int) and tuple(node.args[1:]) in ((1, 2), (2, 1)) and _is(node.args[0], aten.view.default, aten.reshape.default):
        source = node.args[0].args[0]
        if source.meta.get("val") is not None and source.meta["val"].dim() == 3:
            return source
    with gm.graph.inserting_before(before):
        t = gm.graph.call_function(aten.transpose.int, (node, 1, 2))
        return gm.graph.call_function(aten.flatten.using_ints, (t, 2, 3))


def _uncast(node):
    while _is(node, *_CASTS):
        node = node.args[0]
    return node


def _rope(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(x, cos, sin)`` when ``node`` is ``x * cos + rotate_half(x) * sin`` (RoPE, halves rotated)."""
    if not _is(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    for m1, m2 in (node.args, node.args[::-1]):
        if not (_is(m1, aten.mul.Tensor) and _is(m2, aten.mul.Tensor)):
            continue
        for x, cos in (m1.args, m1.args[::-1]):
            for rot, sin in (m2.args, m2.args[::-1]):
                if not (_is(rot, aten.cat.default) and len(rot.args[0]) == 2 and rot.args[1] in (-1, 3)):
                    continue
                neg, low = rot.args[0]
                if not (_is(neg, aten.neg.default) and _is(low, aten.slice.Tensor) and _is(neg.args[0], aten.slice.Tensor)):
                    continue
                high = neg.args[0]
                if high.args[0] is x and low.args[0] is x and low.args[2] == 0 and high.args[1] in (-1, 3):
                    return x, cos, sin
    return None


def _rope_tables(cos: fx.Node, sin: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(inv_freq get_attr, position_ids)`` when ``cos``/``sin`` are the Hugging Face rotary embedding of
    ``position_ids * inv_freq`` (``cat([f, f]) -> cos/sin``, attention scaling 1), else None."""
    found = []
    for node, fn in ((cos, aten.cos.default), (sin, aten.sin.default)):
        node = _uncast(node)
        while _is(node, aten.unsqueeze.default, *_CASTS):
            node = node.args[0]
        if _is(node, aten.mul.Tensor) and node.args[1] == 1.0:  # attention_scaling of the default RoPE
            node = _uncast(node.args[0])
        if not _is(node, fn):
            return None
        emb = node.args[0]
        if not (_is(emb, aten.cat.default) and len(emb.args[0]) == 2 and emb.args[0][0] is emb.args[0][1]):
            return None
        freqs = emb.args[0][0]
        if not _is(freqs, aten.mul.Tensor):
            return None
        a, b = (_uncast(arg) for arg in freqs.args)
        inv, pos = (a, b) if a.op == "get_attr" else (b, a)
        while _is(pos, aten.unsqueeze.default, *_CASTS):
            pos = pos.args[0]
        if inv.op != "get_attr" or pos.op != "placeholder":
            return None
        found.append((inv, pos))
    return found[0] if found[0] == found[1] else None


def _output_tokens(sdpa: fx.Node) -> fx.Node | None:
    """The node that takes the attention output back to ``[B, S, H * D]`` (``reshape/transpose/reshape``, a
    ``contiguous`` between them where the model was captured on the meta device)."""
    node = sdpa
    for _ in range(4):
        users = list(node.users)
        if len(users) != 1 or not _is(users[0], aten.reshape.default, aten.view.default, aten.transpose.int,
                                      aten.contiguous.default, *_CASTS):  # contiguous: captured on the meta device
            break
        node = users[0]
        val = node.meta.get("val")
        if _is(node, aten.reshape.default, aten.view.default) and val is not None and val.dim() == 3:
            return node
    return None


class FuseAttentionPass(PassBase):
    """Replace every KV-cache attention of a decoder graph by one ``llmq.group_query_attention``."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        mask = placeholders.get("attention_mask")
        if mask is None:
            return PassResult(gm, False)
        lengths = None
        tables: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        count = rotary = 0
        context = gm.meta.get("llmq_fx", {}).get("decoder", {}).get("context_length")
        for sdpa in [n for n in graph.nodes if _is(n, _SDPA)]:
            q, k_all, v_all = sdpa.args[:3]
            k_cat, v_cat, out = _cache_cat(k_all), _cache_cat(v_all), _output_tokens(sdpa)
            q_val = q.meta.get("val")
            if k_cat is None or v_cat is None or out is None or q_val is None or q_val.dim() != 4:
                logger.info("attention %s does not match the KV-cache pattern; left as it is", sdpa.name)
                continue
            if sdpa.kwargs.get("dropout_p", 0.0) or (len(sdpa.args) > 4 and sdpa.args[4]):
                continue
            heads, head_size = int(q_val.shape[1]), int(q_val.shape[3])
            if head_size % 8:
                # onnxruntime's CPU kernel takes head sizes that are multiples of 8 only.
                logger.info("attention %s: head size %d is not a multiple of 8; left as it is", sdpa.name, head_size)
                continue
            kv_heads = int(k_cat.meta["val"].shape[1])
            scale = sdpa.kwargs.get("scale")
            scale = float(scale) if scale is not None else head_size ** -0.5
            if lengths is None:
                with graph.inserting_before(sdpa):
                    total = graph.call_function(aten.sym_size.int, (mask, 1))
                    length = graph.call_function(aten.scalar_tensor.default, (total,), {"dtype": torch.int32})
                    summed = graph.call_function(aten.sum.dim_IntList, (mask, [-1]))
                    seqlens = graph.call_function(aten.sub.Tensor, (summed, 1))
                    seqlens = graph.call_function(aten._to_copy.default, (seqlens,), {"dtype": torch.int32})
                lengths = (seqlens, length)
            k_new = k_cat.args[0][1]
            rope_q, rope_k = _rope(q), _rope(k_new)
            rope = None
            if rope_q and rope_k and context and rope_q[1:] == rope_k[1:]:
                rope = _rope_tables(rope_q[1], rope_q[2])
            cos_cache = sin_cache = positions = None
            if rope is not None:  # the op rotates q and k itself, from cos/sin tables of every position
                inv_freq, positions = rope
                if inv_freq not in tables:
                    tables[inv_freq] = _rope_caches(gm, inv_freq, context, before=lengths[0])
                cos_cache, sin_cache = tables[inv_freq]
                q, k_new = rope_q[0], rope_k[0]
                rotary += 1
            query = _heads_to_tokens(gm, q, sdpa)
            key = _heads_to_tokens(gm, k_new, sdpa)
            value = _heads_to_tokens(gm, v_cat.args[0][1], sdpa)
            past_k, past_v = _cache_input(k_cat.args[0][0]), _cache_input(v_cat.args[0][0])
            with graph.inserting_before(sdpa):
                fused = graph.call_function(
                    torch.ops.llmq.group_query_attention.default,
                    (query, key, value, past_k, past_v, *lengths, cos_cache, sin_cache, positions, heads, kv_heads, scale),
                )
                outputs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
            fused.meta["nn_module_stack"] = sdpa.meta.get("nn_module_stack", {})
            out.replace_all_uses_with(outputs[0])
            # The caches are graph outputs; the broadcast nodes that also read them die with the attention.
            k_cat.replace_all_uses_with(outputs[1], delete_user_cb=lambda user: user.op == "output")
            v_cat.replace_all_uses_with(outputs[2], delete_user_cb=lambda user: user.op == "output")
            count += 1
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        logger.debug("fused %d attentions (%d with their rotary embedding)", count, rotary)
        return PassResult(gm, bool(count))


def _rope_caches(gm: fx.GraphModule, inv_freq: fx.Node, context: int, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``cos``/``sin`` of ``position * inv_freq`` for every position up to ``context`` (``[context, D/2]``),
    computed in the graph from ``inv_freq`` (onnxruntime folds them into tables when it loads the model)."""
    graph = gm.graph
    with graph.inserting_before(before):
        positions = graph.call_function(aten.arange.default, (context,), {"dtype": torch.float32})
        column = graph.call_function(aten.unsqueeze.default, (positions, 1))
        row = graph.call_function(aten.unsqueeze.default, (inv_freq, 0))
        freqs = graph.call_function(aten.mul.Tensor, (column, row))
        return graph.call_function(aten.cos.default, (freqs,)), graph.call_function(aten.sin.default, (freqs,))
