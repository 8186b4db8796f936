import pytest
import torch
from torch import nn

import llmq_fx
from llmq_fx.graph import linear_nodes, module_path


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 20), (2, 64)])
def test_graph_logits_equal_eager_at_other_shapes(opt_model, opt_gm, shape):
    ids = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ref = opt_model(input_ids=ids, use_cache=False).logits
        out = opt_gm(ids)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_opt350m_shape_traces_exactly(opt350_model):
    gm = llmq_fx.trace(opt350_model)
    ids = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(gm(ids), opt350_model(input_ids=ids, use_cache=False).logits)
    paths = {module_path(n) for n in linear_nodes(gm.graph)}
    assert {"model.decoder.project_in", "model.decoder.project_out"} <= paths


def test_every_linear_maps_to_its_module_and_parameter(opt_model, opt_gm):
    hf_linears = {name for name, m in opt_model.named_modules() if isinstance(m, nn.Linear)}
    nodes = linear_nodes(opt_gm.graph)
    assert {module_path(n) for n in nodes} == hf_linears
    assert len(nodes) == len(hf_linears)
    for n in nodes:
        path = module_path(n)
        if path != "lm_head":  # lm_head reads the tied embedding attribute
            assert n.args[1].target == f"{path}.weight"
        assert opt_gm.get_parameter(n.args[1].target) is opt_model.get_parameter(n.args[1].target)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, input_ids):
        x = self.lin(input_ids.float().unsqueeze(-1).expand(-1, -1, 4))
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return x
        return -x


def test_untraceable_model_names_class_and_op():
    with pytest.raises(llmq_fx.UnsupportedModelError, match="_DataDependent"):
        llmq_fx.trace(_DataDependent())


def test_non_module_is_rejected():
    with pytest.raises(llmq_fx.UnsupportedModelError, match="nn.Module"):
        llmq_fx.trace(object())
